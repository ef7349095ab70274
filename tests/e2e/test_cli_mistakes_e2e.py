"""Everyday mistakes at the `blindinfer` command line, against a real simulation server.

Each one must be answered by at most two lines on stderr (the simulation banner aside)
that say what went wrong and what to do, with the exit status of the one table in
blindinfer.cli.errors (docs/cli.md), and never with a Python traceback.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from blindinfer.cli.args import parse_size
from blindinfer.cli.errors import BANNER
from blindinfer.cli.main import build_parser
from blindinfer.server.process import ServerProcess
from support import onnx_models as zoo

pytestmark = pytest.mark.e2e

REFUSED, USAGE, POLICY, SERVER = 1, 2, 3, 4


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class World:
    url: str
    port: int
    dead: str  # https URL where nothing listens
    plain: str  # https URL of a port that answers plain HTTP, not TLS
    policy: Path
    wrong_policy: Path  # authentic server, other MRENCLAVE
    bad_policy: Path  # malformed TOML values
    model: Path
    npy: Path
    npz: Path
    dir: Path
    missing: Path


@pytest.fixture(scope="module")
def world(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("mistakes")
    policy = base / "policy.toml"
    made = cli("policy", "--from", server.url, "--simulation")
    assert made.returncode == 0, made.stderr
    policy.write_text(made.stdout)
    mrenclave = next(
        line.split('"')[1] for line in made.stdout.splitlines() if line.startswith("mrenclave")
    )
    wrong = base / "wrong.toml"
    wrong.write_text(made.stdout.replace(mrenclave, "00" * 32))
    bad = base / "bad.toml"
    bad.write_text("[sgx]\nmrenclave = 3\n")
    model = base / "mlp.onnx"
    model.write_bytes(zoo.model_bytes(zoo.mlp_model(in_features=4, hidden=8, out_features=2)))
    multi = base / "multi.onnx"
    multi.write_bytes(zoo.model_bytes(zoo.multi_io_model()))
    common = ["--url", server.url, "--policy", str(policy), "--simulation"]
    for path, name in ((model, "mistakes-mlp"), (multi, "mistakes-multi")):
        uploaded = cli("upload", str(path), "--name", name, *common)
        assert uploaded.returncode == 0, uploaded.stderr
    npy = base / "x.npy"
    np.save(npy, np.ones((3, 4), np.float32))
    npz = base / "x.npz"
    np.savez(npz, x=np.ones((3, 4), np.float32))
    port = int(server.url.rsplit(":", 1)[1])
    plain = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_answer_plain_http, args=(plain,), daemon=True).start()
    yield World(
        url=server.url,
        port=port,
        dead=f"https://127.0.0.1:{free_port()}",
        plain=f"https://127.0.0.1:{plain.getsockname()[1]}",
        policy=policy,
        wrong_policy=wrong,
        bad_policy=bad,
        model=model,
        npy=npy,
        npz=npz,
        dir=base,
        missing=base / "absent.toml",
    )
    plain.close()
    for name in ("mistakes-mlp", "mistakes-multi"):
        cli("delete", name, *common)


def _answer_plain_http(listener: socket.socket) -> None:
    """A port where something else than a blindinfer server listens (plain HTTP)."""
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")


def client(w: World, command: str, *args: str, url: str | None = None) -> list[str]:
    return [command, *args, "--url", url or w.url, "--policy", str(w.policy), "--simulation"]


def proxy(w: World, *args: str, upstream: str | None = None) -> list[str]:
    listen = ["--listen", f"127.0.0.1:{free_port()}"]
    return ["proxy", "--policy", str(w.policy), "--upstream", upstream or w.url, *listen, *args]


Case = tuple[str, Callable[[World], list[str]], int, str]

MISTAKES: list[Case] = [
    # server not running, wrong port, unknown host
    ("attest-not-running", lambda w: ["attest", w.dead, "--simulation"], SERVER, "refused"),
    ("policy-not-running", lambda w: ["policy", "--from", w.dead], SERVER, "is the server running"),
    (
        "upload-not-running",
        lambda w: client(w, "upload", str(w.model), url=w.dead),
        SERVER,
        "connection refused",
    ),
    (
        "run-not-running",
        lambda w: client(w, "run", "m", str(w.npz), url=w.dead),
        SERVER,
        "connection refused",
    ),
    ("delete-not-running", lambda w: client(w, "delete", "m", url=w.dead), SERVER, "refused"),
    ("models-not-running", lambda w: client(w, "models", url=w.dead), SERVER, "refused"),
    (
        "proxy-upstream-not-running",
        lambda w: proxy(w, "--simulation", upstream=w.dead),
        SERVER,
        "connection refused",
    ),
    (
        "attest-unknown-host",
        lambda w: ["attest", "https://no-such-host.invalid:9924"],
        SERVER,
        "unknown host",
    ),
    (
        "models-unknown-host",
        lambda w: client(w, "models", url="https://no-such-host.invalid:9924"),
        SERVER,
        "unknown host",
    ),
    ("attest-not-tls", lambda w: ["attest", w.plain], SERVER, "TLS handshake failed"),
    # http:// or no scheme
    (
        "attest-http",
        lambda w: ["attest", w.url.replace("https", "http")],
        USAGE,
        "use https://127.0.0.1",
    ),
    ("attest-no-scheme", lambda w: ["attest", "127.0.0.1:9924"], USAGE, "use https://127.0.0.1"),
    (
        "models-http",
        lambda w: client(w, "models", url="http://127.0.0.1:9924"),
        USAGE,
        "use https://",
    ),
    ("policy-no-scheme", lambda w: ["policy", "--from", "localhost:9924"], USAGE, "use https://"),
    (
        "proxy-http-upstream",
        lambda w: proxy(w, upstream="http://127.0.0.1:9924"),
        USAGE,
        "use https://",
    ),
    # missing files, directories
    ("upload-missing-model", lambda w: client(w, "upload", "nope.onnx"), USAGE, "does not exist"),
    ("upload-directory", lambda w: client(w, "upload", str(w.dir)), USAGE, "is a directory"),
    (
        "run-missing-inputs",
        lambda w: client(w, "run", "mistakes-mlp", "nope.npz"),
        USAGE,
        "inputs file 'nope.npz' does not exist",
    ),
    (
        "run-inputs-not-numpy",
        lambda w: client(w, "run", "mistakes-mlp", str(w.policy)),
        USAGE,
        "is not a NumPy .npz or .npy file",
    ),
    (
        "attest-missing-policy",
        lambda w: ["attest", w.url, "--policy", str(w.missing)],
        USAGE,
        "policy file",
    ),
    (
        "models-policy-directory",
        lambda w: ["models", "--url", w.url, "--policy", str(w.dir)],
        USAGE,
        "is a directory",
    ),
    (
        "proxy-missing-policy",
        lambda w: ["proxy", "--policy", str(w.missing), "--upstream", w.url],
        USAGE,
        "cannot read the policy file",
    ),
    ("verify-missing-bundle", lambda w: ["verify", "nope.json"], USAGE, "bundle 'nope.json'"),
    (
        "verify-not-a-bundle",
        lambda w: ["verify", str(w.model)],
        USAGE,
        "is not an evidence bundle",
    ),
    (
        "verify-missing-quote",
        lambda w: ["verify", "--intel-quote", "q.bin", "--collateral", str(w.model)],
        USAGE,
        "quote file 'q.bin' does not exist",
    ),
    (
        "verify-collateral-directory",
        lambda w: ["verify", "--intel-quote", str(w.model), "--collateral", str(w.dir)],
        USAGE,
        "is a directory",
    ),
    (
        "verify-missing-vcek",
        lambda w: ["verify", "--snp-report", str(w.model), "--vcek", "vcek.der"],
        USAGE,
        "VCEK file",
    ),
    (
        "verify-receipt-missing-proof",
        lambda w: ["verify-receipt", "proof.json", "--policy", str(w.policy)],
        USAGE,
        "proof file 'proof.json' does not exist",
    ),
    (
        "verify-receipt-npy-inputs",
        lambda w: [
            "verify-receipt",
            str(w.model),
            "--policy",
            str(w.policy),
            "--inputs",
            str(w.npy),
        ],
        USAGE,
        "save them by name",
    ),
    (
        "serve-missing-auth-file",
        lambda w: ["serve", "--simulation", "--port", "0", "--auth-file", "tenants.toml"],
        USAGE,
        "auth file 'tenants.toml' does not exist",
    ),
    (
        "serve-store-dir-is-a-file",
        lambda w: ["serve", "--simulation", "--port", "0", "--store-dir", str(w.model)],
        USAGE,
        "is a file, not a directory",
    ),
    ("audit-missing-log", lambda w: ["audit", "verify", "audit.log"], USAGE, "does not exist"),
    (
        "malformed-policy",
        lambda w: ["attest", w.url, "--policy", str(w.bad_policy)],
        USAGE,
        "policy",
    ),
    # .npy for a model with several inputs
    (
        "run-npy-several-inputs",
        lambda w: client(w, "run", "mistakes-multi", str(w.npy)),
        USAGE,
        "takes 3 inputs (features, ids, mask)",
    ),
    # --at yesterday
    (
        "verify-at-yesterday",
        lambda w: [
            "verify",
            "--intel-quote",
            str(w.model),
            "--collateral",
            str(w.model),
            "--at",
            "yesterday",
        ],
        USAGE,
        "Unix seconds (1752919234) or ISO 8601",
    ),
    # listen ports
    (
        "serve-port-in-use",
        lambda w: ["serve", "--simulation", "--port", str(w.port)],
        USAGE,
        "already in use",
    ),
    ("serve-port-out-of-range", lambda w: ["serve", "--port", "70000"], USAGE, "invalid port"),
    (
        "serve-port-is-a-blindai-port",
        lambda w: ["serve", "--simulation", "--blindai-compat"],
        USAGE,
        "--port 9924 is also one of the BlindAI ports (9923,9924,9925)",
    ),
    ("serve-port-not-a-number", lambda w: ["serve", "--port", "http"], USAGE, "invalid port"),
    (
        "proxy-listen-in-use",
        lambda w: [*proxy(w, "--simulation"), "--listen", f"127.0.0.1:{w.port}"],
        USAGE,
        "already in use",
    ),
    (
        "proxy-replicas-zero",
        lambda w: proxy(w, "--simulation", "--replicas", "0"),
        USAGE,
        "replicas must be from 1 to 256, got 0",
    ),
    (
        "proxy-listen-out-of-range",
        lambda w: [*proxy(w), "--listen", "127.0.0.1:99999"],
        USAGE,
        "port from 1 to 65535",
    ),
    (
        "proxy-remote-listen",
        lambda w: [*proxy(w), "--listen", "0.0.0.0:8000"],
        USAGE,
        "--allow-remote",
    ),
    # forgetting --simulation
    ("attest-without-simulation", lambda w: ["attest", w.url], REFUSED, "pass --simulation"),
    ("policy-without-simulation", lambda w: ["policy", "--from", w.url], REFUSED, "--simulation"),
    (
        "models-without-simulation",
        lambda w: ["models", "--url", w.url, "--policy", str(w.policy)],
        REFUSED,
        "--simulation",
    ),
    ("proxy-without-simulation", lambda w: proxy(w), REFUSED, "pass --simulation"),
    # a policy the server does not satisfy
    (
        "attest-policy-mismatch",
        lambda w: ["attest", w.url, "--policy", str(w.wrong_policy), "--simulation"],
        POLICY,
        "mrenclave: expected 0000",
    ),
    (
        "run-unknown-model",
        lambda w: client(w, "run", "no-such-model", str(w.npz)),
        SERVER,
        "blindinfer models",
    ),
    # sizes
    (
        "serve-bad-size",
        lambda w: ["serve", "--simulation", "--memory-budget-bytes", "8X"],
        USAGE,
        "argument --memory-budget-bytes: invalid size '8X'",
    ),
    (
        "measure-decimal-size",
        lambda w: ["measure", "--simulation", "--max-model-bytes", "1.5G"],
        USAGE,
        "--max-model-bytes",
    ),
    (
        "proxy-bad-size",
        lambda w: [*proxy(w), "--max-request-bytes", "lots"],
        USAGE,
        "--max-request-bytes",
    ),
    (
        "serve-zero-workers",
        lambda w: ["serve", "--simulation", "--workers", "0"],
        USAGE,
        "--workers",
    ),
    # argparse's own mistakes, in two lines
    ("new-key-missing-options", lambda w: ["new-key", "--tenant", "a"], USAGE, "--role"),
    ("unknown-command", lambda w: ["attset"], USAGE, "invalid choice"),
    ("demo-extra-argument", lambda w: ["demo", "--fast"], USAGE, "unrecognized arguments"),
]


def _stderr_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and line != BANNER]


@pytest.mark.parametrize(("case", "args", "code", "phrase"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake(
    world: World, case: str, args: Callable[[World], list[str]], code: int, phrase: str
) -> None:
    result = cli(*args(world))
    shown = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode == code, shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    lines = _stderr_lines(result.stderr)
    assert 1 <= len(lines) <= 2, shown
    assert phrase in result.stderr, shown
    assert "simulation=True" not in result.stderr, shown


def test_measure_without_simulation_refuses_like_serve() -> None:
    from blindinfer.tee.detect import detect_platform

    if detect_platform() is not None:
        pytest.skip("this machine has a TEE")
    served, measured = cli("serve", "--port", "0"), cli("measure")
    assert served.returncode == measured.returncode == USAGE
    assert "no TEE platform found" in measured.stderr and "--simulation" in measured.stderr
    said = [line.removeprefix("blindinfer measure: ") for line in _stderr_lines(measured.stderr)]
    told = [line.removeprefix("blindinfer serve: ") for line in _stderr_lines(served.stderr)]
    assert len(said) == 2 and said == told[-2:]
    assert "mrenclave" not in measured.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_model(world: World, tmp_path: Path) -> None:
    locked = tmp_path / "locked.onnx"
    locked.write_bytes(world.model.read_bytes())
    locked.chmod(0)
    result = cli(*client(world, "upload", str(locked)))
    assert result.returncode == USAGE and "not readable" in result.stderr


def test_debug_shows_the_traceback(world: World) -> None:
    for args, env in (
        (["--debug", "attest", world.dead], None),
        (["attest", "--debug", world.dead], None),
        (["attest", world.dead], {"BLINDINFER_DEBUG": "1"}),
    ):
        result = cli(*args, env=env)
        assert result.returncode == SERVER
        assert "Traceback" in result.stderr
        assert "connection refused" in result.stderr.splitlines()[-2]


def test_simulation_warning_is_one_banner_line(world: World) -> None:
    result = cli(*client(world, "models"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [BANNER]
    assert "SimulationWarning" not in result.stderr and ".py:" not in result.stderr


def test_run_accepts_npy_for_a_single_input_model(world: World) -> None:
    out = world.dir / "out.npz"
    result = cli(*client(world, "run", "mistakes-mlp", str(world.npy), "--output", str(out)))
    assert result.returncode == 0, result.stderr
    with np.load(out) as got:
        assert got["probabilities"].shape == (3, 2)


def test_models_table(world: World) -> None:
    short = cli(*client(world, "models"))
    long = cli(*client(world, "models", "--long"))
    assert short.returncode == long.returncode == 0, short.stderr + long.stderr
    header = short.stdout.splitlines()[0].split()
    assert header[:3] == ["NAME", "MODEL", "ID"] and "SHA-256" in header
    rows = {line.split()[0]: line.split() for line in short.stdout.splitlines()[1:]}
    long_rows = {line.split()[0]: line.split() for line in long.stdout.splitlines()[1:]}
    assert {"mistakes-mlp", "mistakes-multi"} <= rows.keys()
    mlp, mlp_long = rows["mistakes-mlp"], long_rows["mistakes-mlp"]
    assert mlp[1] == mlp_long[1] and mlp[1].startswith("m-")  # full model_id both ways
    sha = next(cell for cell in mlp_long if len(cell) == 64)
    short_sha = next(cell for cell in mlp if sha.startswith(cell) and len(cell) >= 16)
    assert len(short_sha) < 64


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1024", 1024),
        ("512B", 512),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("8G", 8 << 30),
        ("8gb", 8 << 30),
        ("8 GiB", 8 << 30),
        ("2T", 2 << 40),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "8X", "1.5G", "-1", "G", "8GG", "8iB", "eight"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="K, M, G or T"):
        parse_size(text)


def test_sizes_reach_the_server_settings() -> None:
    args = build_parser().parse_args(
        ["serve", "--memory-budget-bytes", "8G", "--max-model-bytes", "1536M"]
    )
    assert args.memory_budget_bytes == 8 << 30 and args.max_model_bytes == 1536 << 20
    assert build_parser().parse_args(["serve"]).max_model_bytes == 512 << 20
    proxy_args = build_parser().parse_args(
        ["proxy", "--policy", "p", "--upstream", "https://h:1", "--max-response-bytes", "2G"]
    )
    assert proxy_args.max_response_bytes == 2 << 30


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def test_every_option_has_help() -> None:
    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in _parsers(build_parser())
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == []


def test_help_says_defaults_and_where_to_start() -> None:
    top = cli("--help")
    assert top.returncode == 0
    assert "Trusted Execution Environment" in top.stdout and "docs/cli.md" in top.stdout
    serve = " ".join(cli("serve", "--help").stdout.split())
    assert "(default: 4G)" in serve and "(default: 9924)" in serve and "512M or 8G" in serve
