"""Cost of a receipt per inference, end to end (server signs, client verifies).

For each model (a small MLP; MiniLM b1 x 128 tokens if available; a model with MiniLM's
output shape and no compute) runs the same inference
with and without `receipt=True` in alternating blocks on one attested connection, and
prints the median latency of each and the difference (absolute and relative). Also prints
the server-side cost alone (tensor digests + ES256 signature). Not a test: asserts nothing.
`--baseline-src DIR` also starts a server from another checkout (a `git worktree` of
HEAD) and interleaves it with this tree's, so before/after come from one run (the client
is this tree's in both).
Run: `.venv/bin/python bench/bench_receipts.py [--quick] [--no-minilm] [--baseline-src DIR]`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_inference import models  # noqa: E402
from timing import interleaved, machine  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.protocol.receipts import es256_sign, key_id, sign_receipt, tensor_digest  # noqa: E402
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
                    variants[f"{name}, receipt={receipt}"] = functools.partial(
                        client.run_model, sha, feed, receipt=receipt
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
            key = ec.generate_private_key(ec.SECP256R1())
            kid = key_id(key.public_key())
            n = 200
            start = time.perf_counter()
            for _ in range(n):
                sign_receipt(
                    {
                        "inputs_digest": tensor_digest(feed),
                        "outputs_digest": tensor_digest(outputs),
                    },
                    functools.partial(es256_sign, key),
                    kid,
                )
            server_side = (time.perf_counter() - start) / n * 1000
            print(f"  server-side digests + ES256 signature alone: {server_side:.3f} ms")


if __name__ == "__main__":
    main()
