"""The fixed cost of a request, before and after: two servers side by side in ONE run.

Starts the server of this tree and, with `--base-src DIR` (the `src` folder of a clean
`git worktree` of the commit to compare against, e.g. `git worktree add /tmp/base HEAD`),
a second server running that code (PYTHONPATH), whose clients send as before
client/coalesce.py (head and body in two writes). Then, interleaved in blocks so that the
machine's load hits every variant alike:
  - in-process onnxruntime `session.run` (a default session, as a user would write it)
  - the same model through the blindinfer client over attested TLS, on each server
for the MLP 64-256-10 (batch 1: nearly all fixed cost) and MiniLM-L6 batch 1 x 128, and
then 8 concurrent clients (one attested connection each) on each server, alternating, as
aggregate requests/s divided by the in-process single-stream rate.

Run: `.venv/bin/python bench/bench_fixed_cost.py --base-src /tmp/base/src` (`--quick`
for fewer iterations, `--no-minilm` for the MLP only). Extra server options after `--`
go to both servers. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from timing import interleaved, machine, percentile  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.client import coalesce as client_coalesce  # noqa: E402
from blindinfer.server.process import ServerProcess, start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import onnx_models  # noqa: E402


@contextmanager
def server_from(src: str | None, args: Sequence[str]) -> Iterator[ServerProcess]:
    """A server process importing blindinfer from `src` (None: this tree)."""
    saved = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = src
    try:
        server = start_server(["--simulation", *args])
    finally:
        if src is not None:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
    with server:
        yield server


def mrenclave_of(src: str | None) -> bytes:
    """The simulated MRENCLAVE of the server code in `src`: it hashes that code's config,
    so two trees may differ."""
    env = {**os.environ, **({"PYTHONPATH": src} if src is not None else {})}
    code = (
        "from blindinfer.server.config import ServerConfig;"
        "from blindinfer.server.platforms import simulated_mrenclave;"
        "print(simulated_mrenclave(ServerConfig(simulation=True)).hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return bytes.fromhex(out.stdout.strip())


def connect(url: str, mrenclave: bytes, coalesce: bool = True) -> blindinfer.Client:
    """`coalesce=False`: the client as it was before client/coalesce.py (for the base)."""
    client_coalesce.ENABLED = coalesce
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(mrenclave=(mrenclave,), mrsigner=(SIMULATION_MRSIGNER,))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        try:
            return blindinfer.connect(url, policy=policy, simulation=True)
        finally:
            client_coalesce.ENABLED = True


def concurrent_rps(
    url: str,
    mrenclave: bytes,
    coalesce: bool,
    model: str,
    feed: dict[str, np.ndarray],
    seconds: float,
) -> float:
    connections = [connect(url, mrenclave, coalesce) for _ in range(8)]
    for c in connections:
        c.run_model(model, feed)
    counts = [0] * len(connections)
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        while time.perf_counter() < stop:
            connections[i].run_model(model, feed)
            counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(connections))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for c in connections:
        c.close()
    return sum(counts) / elapsed


def models(include_minilm: bool) -> list[tuple[str, bytes, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    chosen = [
        (
            "mlp-64-256-10 b1",
            onnx_models.model_bytes(onnx_models.mlp_model()),
            {"x": rng.standard_normal((1, 64)).astype(np.float32)},
        )
    ]
    if include_minilm:
        from support import minilm

        feed = minilm.minilm_inputs(["The quick brown fox jumps over the lazy dog."], seq_len=128)
        chosen.append(("minilm-l6 b1x128", minilm.minilm_onnx_path().read_bytes(), feed))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-src", help="src folder of the code to compare against")
    parser.add_argument("--tree-src", help="src folder of the code measured (default: this tree)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--no-concurrent", action="store_true")
    parser.add_argument("server_args", nargs="*", help="options for both servers (after --)")
    args = parser.parse_args()
    rounds = 6 if args.quick else 20
    seconds = 2.0 if args.quick else 5.0
    print(machine())
    sources: dict[str, str | None] = {"tree": args.tree_src}
    if args.base_src:
        sources = {"base": args.base_src, "tree": args.tree_src}
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(server_from(src, args.server_args))
            for name, src in sources.items()
        }
        enclaves = {name: mrenclave_of(src) for name, src in sources.items()}
        clients = {
            name: stack.enter_context(connect(s.url, enclaves[name], name != "base"))
            for name, s in servers.items()
        }
        for label, model, feed in models(not args.no_minilm):
            session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            ids = {name: c.upload_model(model, name="m").model_id for name, c in clients.items()}
            variants: dict[str, Callable[[], object]] = {
                "in-process": lambda s=session, f=feed: s.run(None, f)
            }
            for name, c in clients.items():
                variants[name] = lambda c=c, m=ids[name], f=feed: c.run_model(m, f)
            block = 10 if "minilm" in label else 50
            samples = interleaved(variants, rounds * block, block=block, warmup=3)
            base = statistics.median(samples["in-process"])
            print(f"\n{label}: median / p99 ms, ratio to in-process, difference")
            for name, values in samples.items():
                median = statistics.median(values)
                print(
                    f"  {name:<11} {median:8.3f} / {percentile(values, 99):8.3f}   "
                    f"{median / base:5.2f}x   +{median - base:6.3f} ms"
                )
            if not args.no_concurrent:
                rps = 1000 / base
                rates: dict[str, list[float]] = {name: [] for name in clients}
                for _ in range(3):
                    for name, s in servers.items():
                        rates[name].append(
                            concurrent_rps(
                                s.url, enclaves[name], name != "base", ids[name], feed, seconds
                            )
                        )
                for name, values in rates.items():
                    shown = ", ".join(f"{v / rps:.2f}" for v in values)
                    print(
                        f"  8 clients on {name}: {statistics.median(values):8.1f} req/s, "
                        f"/ in-process single stream {rps:.1f}/s: {shown}"
                    )
            for name, c in clients.items():
                c.delete_model(ids[name])


if __name__ == "__main__":
    main()
