"""Cost of a receipt per inference, end to end (server signs, client verifies).

For each model (a small MLP; MiniLM b1 x 128 tokens if available; a model with MiniLM's
output shape and no compute) runs the same inference
with and without `receipt=True` in alternating blocks on one attested connection, and
prints the median latency of each and the difference (absolute and relative). Also prints
each side's receipt work alone (server: tensor digests + ES256 signature; client:
verification + digests), back to back and after an idle wait of a few ms, which is how a
request meets it (evicted caches). Not a test: asserts nothing.
`--baseline-src DIR` also starts a server from another checkout (a `git worktree` of
HEAD) and interleaves it with this tree's, so before/after come from one run; the
baseline's rows also check receipts with that checkout's `client/receipts.py` and
`protocol/receipts.py` (loaded beside this tree's; the rest of the client is this tree's).
Run: `.venv/bin/python bench/bench_receipts.py [--quick] [--no-minilm] [--baseline-src DIR]`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_inference import models  # noqa: E402
from timing import interleaved, machine  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.client import client as client_module  # noqa: E402
from blindinfer.protocol.receipts import (  # noqa: E402
    es256_sign,
    key_id,
    parse_and_verify_jws,
    sign_receipt,
    tensor_digest,
)
from blindinfer.server.config import ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _policy(mrenclave: bytes) -> blindinfer.Policy:
    return blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(mrenclave=(mrenclave,), mrsigner=(SIMULATION_MRSIGNER,))
    )


@contextlib.contextmanager
def _server(source: Path | None) -> Iterator[tuple[str, bytes]]:
    """A simulation server from this tree, or from `source` (another checkout's root, e.g.
    a `git worktree` of HEAD): its URL and simulated MRENCLAVE."""
    if source is None:
        with start_server(["--simulation"]) as server:
            yield server.url, simulated_mrenclave(ServerConfig(simulation=True))
        return
    env = {**os.environ, "PYTHONPATH": str(source / "src")}
    mrenclave = subprocess.run(
        [sys.executable, "-c", _MRENCLAVE], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # start_server passes os.environ on
    try:
        server = start_server(["--simulation"])
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    with server:
        yield server.url, bytes.fromhex(mrenclave)


_CHECK = "check_receipt"
"""The name client.py calls its receipt check by (swapped for the baseline's rows)."""


def _receipt_check(source: Path | None) -> Callable[..., object]:
    """`check_receipt` of this tree, or of the checkout `source`: its client/receipts.py
    and protocol/receipts.py loaded as modules of their own (the rest from this tree)."""
    if source is None:
        this_tree: Callable[..., object] = getattr(client_module, _CHECK)
        return this_tree
    protocol = _load(source, "protocol", "baseline_protocol_receipts")
    saved = sys.modules["blindinfer.protocol.receipts"]
    sys.modules["blindinfer.protocol.receipts"] = protocol  # what its client module imports
    try:
        client = _load(source, "client", "baseline_client_receipts")
    finally:
        sys.modules["blindinfer.protocol.receipts"] = saved
    check: Callable[..., object] = client.check_receipt
    return check


def _load(source: Path, package: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        name, source / "src" / "blindinfer" / package / "receipts.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _checking_with(
    check: Callable[..., object], call: Callable[[], object]
) -> Callable[[], object]:
    """`call` with `check` as the client's receipt check."""

    def run() -> object:
        saved = getattr(client_module, _CHECK)
        setattr(client_module, _CHECK, check)
        try:
            return call()
        finally:
            setattr(client_module, _CHECK, saved)

    return run


def minilm_shaped() -> tuple[str, bytes, dict[str, np.ndarray]]:
    """A model with MiniLM's output (1 x 128 x 384 float32, 197 KB) and no compute: the
    receipt's cost for MiniLM-sized tensors without onnxruntime's run, whose noise on a
    shared machine (several ms) hides a fraction of a millisecond."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Unsqueeze", ["input_ids", "axes"], ["column"]),
        helper.make_node("Cast", ["column"], ["values"], to=TensorProto.FLOAT),
        helper.make_node("Expand", ["values", "shape"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "minilm_shaped",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 128])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [1, 128, 384])],
        [
            numpy_helper.from_array(np.array([1, 128, 384], dtype=np.int64), "shape"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feed = {"input_ids": np.arange(128, dtype=np.int64).reshape(1, 128)}
    return "minilm-shaped, no compute", model.SerializeToString(), feed


_MRENCLAVE = (
    "from blindinfer.server.config import ServerConfig\n"
    "from blindinfer.server.platforms import simulated_mrenclave\n"
    "print(simulated_mrenclave(ServerConfig(simulation=True)).hex())"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        metavar="DIR",
        help="also run a server from this checkout (e.g. `git worktree add --detach "
        "/tmp/head HEAD`), interleaved with this tree's: before/after in one run",
    )
    args = parser.parse_args()
    iterations, block = (50, 10) if args.quick else (500, 25)
    print(machine())
    try:
        chosen = models(not args.no_minilm)
    except Exception as exc:
        print(f"MiniLM unavailable ({exc}); MLP only")
        chosen = models(False)
    chosen.append(minilm_shaped())
    sources: dict[str, Path | None] = {"this tree": None}
    if args.baseline_src is not None:
        sources = {"baseline": args.baseline_src, **sources}
    with contextlib.ExitStack() as stack:
        clients: dict[str, blindinfer.Client] = {}
        checks = {name: _receipt_check(source) for name, source in sources.items()}
        for name, source in sources.items():
            url, mrenclave = stack.enter_context(_server(source))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", blindinfer.SimulationWarning)
                client = blindinfer.connect(url, policy=_policy(mrenclave), simulation=True)
            clients[name] = stack.enter_context(client)
        for label, data, feed in chosen:
            variants: dict[str, Callable[[], object]] = {}
            for name, client in clients.items():
                sha = client.upload_model(data).sha256
                for receipt in (False, True):
                    variants[f"{name}, receipt={receipt}"] = _checking_with(
                        checks[name],
                        functools.partial(client.run_model, sha, feed, receipt=receipt),
                    )
            results = interleaved(variants, iterations, block)
            print(f"{label}: {iterations} requests per variant, interleaved blocks of {block}")
            for name in clients:
                base = statistics.median(results[f"{name}, receipt=False"])
                with_receipt = statistics.median(results[f"{name}, receipt=True"])
                delta = with_receipt - base
                print(
                    f"  {name:<10} without {base:8.3f} ms  with receipt {with_receipt:8.3f} ms  "
                    f"cost {delta:+.3f} ms ({delta / base * 100:+.1f}%)"
                )
            outputs = next(iter(clients.values())).run_model(sha, feed)
            server_ms, client_ms = _alone(feed, outputs)
            print(
                f"  alone, per receipt: server (digests + ES256 signature) {server_ms[0]:.3f} ms, "
                f"after a {IDLE_MS} ms idle wait {server_ms[1]:.3f} ms; client (verification + "
                f"digests) {client_ms[0]:.3f} ms, after the wait {client_ms[1]:.3f} ms"
            )


IDLE_MS = 5
"""An idle wait before each step of `_alone`'s second measure: what a server thread sees
after a model's run (and a client after waiting for the answer) while other processes
used its core and evicted its caches."""


def _alone(
    feed: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median ms of each side's receipt work, back to back (hot caches) and each after an
    idle wait of IDLE_MS (cold: the case of a real request)."""
    key = ec.generate_private_key(ec.SECP256R1())
    kid = key_id(key.public_key())
    sign = functools.partial(es256_sign, key)

    def server() -> dict[str, str]:
        payload = {"inputs_digest": tensor_digest(feed), "outputs_digest": tensor_digest(outputs)}
        return sign_receipt({"v": 1, **payload}, sign, kid)

    jws = server()

    def client() -> None:
        parse_and_verify_jws(jws, key.public_key())
        tensor_digest(feed)
        tensor_digest(outputs)

    results = []
    for step in (server, client):
        hot, cold = [], []
        for _ in range(100):
            start = time.perf_counter()
            step()
            hot.append(time.perf_counter() - start)
        for _ in range(100):
            time.sleep(IDLE_MS / 1000)
            start = time.perf_counter()
            step()
            cold.append(time.perf_counter() - start)
        results.append((_median_ms(hot), _median_ms(cold)))
    return results[0], results[1]


if __name__ == "__main__":
    main()
