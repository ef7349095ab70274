"""What one hostile tenant does to everyone else: issue 21's first three server attacks.

In ONE run, each attack on its own fresh simulation server (separate process, loopback
attested TLS, two tenants from an auth file, --workers 2):
  (1) delete-while-running: tenant A runs a model that loops until the inference timeout
      (20 s here) and, one second in, deletes it. Before the fix the registry lock was held
      while the delete waited for the worker, which stopped every request's model
      resolution and health for up to the timeout.
  (2) huge output: tenant A runs a 99-byte model that Expands a scalar to 64 M float32
      elements (a 256 MiB tensor, a far larger JSON answer) from a 76-byte request.
  (3) unfinished bodies: tenant A opens 8 chunked uploads, sends 64 MiB into each, then
      stops sending and never finishes them (the connections stay open).
While each attack runs (and for the same time before it, idle), two probers measure, each
in its own thread, one request after the other: GET /v2/health/live, and tenant B's
inference on its own small MLP (a different worker is free). Sampled every 50 ms: the
resident memory of the server's process tree (server + workers, /proc). Prints, for idle
and attack windows, the median and max of each latency, failures, the peak RSS and the RSS
at the window's end (what an attack still holds).

Run: `.venv/bin/python bench/bench_attacks.py` (about two minutes; `--seconds N` for the
windows of (1) and (2), `--body-seconds N` for those of (3), which must outlast the 30 s
body timeout; the servers' banners go to stderr, add `2>/dev/null` for the table alone).
Not a test: nothing here asserts a time. Compare commits by running it on each.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from timing import machine  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.client.transport import pinned_context  # noqa: E402
from blindinfer.server.auth import generate_api_key  # noqa: E402
from blindinfer.server.config import Limits, ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import ServerProcess, start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import hostile_models, onnx_models, procmem  # noqa: E402

MiB = 1 << 20
LIMITS = Limits(workers=2, inference_timeout_ms=20_000)


def policy() -> blindinfer.Policy:
    config = ServerConfig(simulation=True, limits=LIMITS)
    return blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(config),),
            mrsigner=(SIMULATION_MRSIGNER,),
            isvprodid=(config.isvprodid,),
            min_isvsvn=config.isvsvn,
        )
    )


def auth_file(path: Path) -> dict[str, str]:
    keys, text = {}, ""
    for tenant in ("a", "b"):
        key, sha = generate_api_key()
        keys[tenant] = key
        text += (
            f'[[tenant]]\nname = "{tenant}"\nrequests_per_second = 100000\nburst = 100000\n'
            f"max_concurrent_inferences = 16\n"
            f'[[tenant.key]]\nid = "{tenant}-owner"\nrole = "owner"\nsha256 = "{sha}"\n\n'
        )
    path.write_text(text)
    return keys


@contextmanager
def running() -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        keys = auth_file(Path(tmp) / "auth.toml")
        args = [
            "--simulation",
            f"--workers={LIMITS.workers}",
            f"--inference-timeout-ms={LIMITS.inference_timeout_ms}",
            f"--store-dir={Path(tmp) / 'store'}",
            f"--auth-file={Path(tmp) / 'auth.toml'}",
        ]
        with start_server(args) as server:
            yield server, keys


def connect(url: str, api_key: str) -> blindinfer.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(
            url, policy=policy(), simulation=True, api_key=api_key, retry=blindinfer.NO_RETRY
        )


def expand_model(elements: int) -> bytes:
    """shape: INT64 [1] -> y = Expand(0.5, shape): the output is `shape` elements."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["v", "shape"], ["y"])],
        "expand",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "v")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = 8
    return onnx_models.model_bytes(model)


# --------------------------------------------------------------------------- measuring


@dataclass
class Window:
    health_ms: list[float] = field(default_factory=list)
    infer_ms: list[float] = field(default_factory=list)
    failures: int = 0
    peak_rss: int = 0
    end_rss: int = 0  # at the end of the window: what the attack still holds


def measure(server: ServerProcess, b: blindinfer.Client, b_model: str, seconds: float) -> Window:
    """Health and tenant B's inference, one after the other, for `seconds`; RSS sampled."""
    window = Window()
    done = threading.Event()

    def sample_rss() -> None:
        while not done.is_set():
            window.peak_rss = max(window.peak_rss, procmem.rss_bytes(server.process.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    feed = {"x": np.ones((1, 64), np.float32)}
    context = pinned_context(b.attestation.certificate_der)
    stop = time.perf_counter() + seconds
    failures = [0]

    def probe(timings: list[float], call: Callable[[], object]) -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                call()
            except Exception:  # a failure is what is being counted
                failures[0] += 1
            else:
                timings.append((time.perf_counter() - start) * 1000)
            time.sleep(0.05)

    with httpx.Client(verify=context, timeout=60) as raw:
        probes = [
            threading.Thread(
                target=probe,
                args=(window.health_ms, lambda: raw.get(server.url + "/v2/health/live")),
            ),
            threading.Thread(
                target=probe, args=(window.infer_ms, lambda: b.run_model(b_model, feed))
            ),
        ]
        for thread in probes:
            thread.start()
        for thread in probes:
            thread.join()
    window.failures = failures[0]
    done.set()
    sampler.join()
    window.end_rss = procmem.rss_bytes(server.process.pid)
    return window


def in_background(action: Callable[[], object]) -> threading.Thread:
    def guarded() -> None:
        with contextlib.suppress(Exception):  # the attack's own outcome is not measured
            action()

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------- attacks


def delete_while_running(a: blindinfer.Client, url: str, api_key: str) -> Callable[[], None]:
    info = a.upload_model(hostile_models.slow_model(), name="slow")

    def attack() -> None:
        in_background(lambda: a.run_model(info.model_id, {"x": np.ones((256, 256), np.float32)}))
        time.sleep(1.0)
        in_background(lambda: a.delete_model(info.model_id))

    return attack


def huge_output(a: blindinfer.Client, url: str, api_key: str) -> Callable[[], None]:
    info = a.upload_model(expand_model(64 << 20), name="expand")

    def attack() -> None:
        in_background(lambda: a.run_model(info.model_id, {"shape": np.array([64 << 20], np.int64)}))

    return attack


def unfinished_bodies(a: blindinfer.Client, url: str, api_key: str) -> Callable[[], None]:
    parts = urlsplit(url)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the bytes sent are junk: nothing to protect
    held: list[ssl.SSLSocket] = []  # open until the server closes them

    def one() -> None:
        raw = socket.create_connection((parts.hostname, parts.port), timeout=30)
        conn = context.wrap_socket(raw, server_hostname=parts.hostname)
        held.append(conn)
        conn.sendall(
            (
                f"PUT /v2/repository/models/_/upload HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Authorization: Bearer {api_key}\r\n"
                "Content-Type: application/octet-stream\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        chunk = b"%x\r\n" % MiB + b"\x00" * MiB + b"\r\n"
        try:
            for _ in range(64):
                conn.sendall(chunk)
        except OSError:
            pass  # refused or cut by the server: what the fix does

    def attack() -> None:
        for _ in range(8):
            in_background(one)

    return attack


def run_attack(
    name: str,
    prepare: Callable[[blindinfer.Client, str, str], Callable[[], None]],
    seconds: float,
) -> tuple[str, Window, Window]:
    with (
        running() as (server, keys),
        connect(server.url, keys["a"]) as a,
        connect(server.url, keys["b"]) as b,
    ):
        b_model = b.upload_model(onnx_models.model_bytes(onnx_models.mlp_model()), name="b")
        for _ in range(5):
            b.run_model(b_model.model_id, {"x": np.ones((1, 64), np.float32)})
        attack = prepare(a, server.url, keys["a"])
        idle = measure(server, b, b_model.model_id, seconds)
        attack()
        under = measure(server, b, b_model.model_id, seconds)
    return name, idle, under


def row(label: str, window: Window) -> str:
    def stats(samples: list[float]) -> str:
        if not samples:
            return f"{'-':>9} {'-':>9}"
        return f"{statistics.median(samples):9.1f} {max(samples):9.1f}"

    return (
        f"  {label:<8} {stats(window.health_ms)} {stats(window.infer_ms)} "
        f"{window.failures:>6} {window.peak_rss / MiB:9.0f} {window.end_rss / MiB:8.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0, help="each measuring window")
    parser.add_argument(
        "--body-seconds",
        type=float,
        default=40.0,
        help="the windows of attack (3): longer than the server's 30 s body timeout",
    )
    args = parser.parse_args()
    print(f"blindinfer attack benchmark; {machine()}")
    print("latencies in ms; RSS = server + workers, MiB, peak and at the window's end")
    print(
        f"  {'window':<8} {'health':>9} {'':>9} {'B infer':>9} {'':>9} {'fails':>6} "
        f"{'peak RSS':>9} {'end RSS':>8}"
    )
    print(f"  {'':<8} {'median':>9} {'max':>9} {'median':>9} {'max':>9}")
    for name, prepare, seconds in (
        ("(1) delete while running", delete_while_running, args.seconds),
        ("(2) 64 M-element output", huge_output, args.seconds),
        ("(3) 8 unfinished 64 MiB chunked uploads", unfinished_bodies, args.body_seconds),
    ):
        title, idle, under = run_attack(f"{name}, {seconds:.0f} s windows", prepare, seconds)
        print(title)
        print(row("idle", idle))
        print(row("attack", under))


if __name__ == "__main__":
    main()
