"""Side-by-side latency of in-process onnxruntime and blindinfer over attested TLS.

In ONE run on the same machine, for each model (MiniLM batch 1 x 128 tokens, a small MLP):
  (a) onnxruntime in-process `session.run`
  (b) the same model through the blindinfer client over attested TLS, sequential
  (c) 8 concurrent clients (one attested connection each), aggregate throughput
  (d) `connect` including full attestation (fresh nonce, dcap-qvl, binding, policy)
Prints median and p99 and the ratios. Run: `.venv/bin/python bench/bench_inference.py`
(`--quick` for fewer iterations). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from timing import percentile, side_by_side, timed  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.server.config import ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import onnx_models  # noqa: E402


def connect(url: str, policy: blindinfer.Policy) -> blindinfer.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(url, policy=policy, simulation=True)


def concurrent_throughput(
    url: str,
    policy: blindinfer.Policy,
    model: str,
    feed: dict[str, np.ndarray],
    clients: int,
    seconds: float,
) -> float:
    connections = [connect(url, policy) for _ in range(clients)]
    for c in connections:
        c.run_model(model, feed)
    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            connections[i].run_model(model, feed)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
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
    mlp = onnx_models.model_bytes(onnx_models.mlp_model())
    chosen = [
        (
            "mlp-64-256-10",
            mlp,
            {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)},
        )
    ]
    if include_minilm:
        from support import minilm

        path = minilm.minilm_onnx_path()
        feed = minilm.minilm_inputs(["The quick brown fox jumps over the lazy dog."], seq_len=128)
        chosen.insert(0, ("minilm-l6 b1x128", path.read_bytes(), feed))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args()
    n = 50 if args.quick else 300
    seconds = 3.0 if args.quick else 10.0
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(ServerConfig(simulation=True)),),
            mrsigner=(SIMULATION_MRSIGNER,),
        )
    )
    rows = []
    with start_server(["--simulation"]) as server:
        connect_ms = timed(
            lambda: connect(server.url, policy).close(), 30 if args.quick else 100, warmup=5
        )
        with connect(server.url, policy) as client:
            for label, model, feed in models(not args.no_minilm):
                session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
                info = client.upload_model(model, name=label.split()[0])
                a, b = side_by_side(
                    lambda s=session, f=feed: s.run(None, f),
                    lambda m=info.model_id, f=feed: client.run_model(m, f),
                    n,
                )
                in_process_rps = 1000 / statistics.median(a)
                c = concurrent_throughput(server.url, policy, info.model_id, feed, 8, seconds)
                rows.append((label, a, b, c, in_process_rps))
                client.delete_model(info.model_id)
    print(
        f"{'model':<18} {'(a) ORT med/p99 ms':>20} {'(b) blindinfer med/p99 ms':>26} {'b/a':>6} "
        f"{'(c) 8 clients req/s':>20} {'c / in-process req/s':>22}"
    )
    for label, a, b, c, rps in rows:
        ratio = statistics.median(b) / statistics.median(a)
        print(
            f"{label:<18} {statistics.median(a):>9.3f} / {percentile(a, 99):<8.3f} "
            f"{statistics.median(b):>12.3f} / {percentile(b, 99):<11.3f} {ratio:>6.2f} "
            f"{c:>20.1f} {c / rps:>15.2f} (in-process {rps:.1f}/s)"
        )
    print(
        f"(d) connect incl. attestation: median {statistics.median(connect_ms):.2f} ms, "
        f"p99 {percentile(connect_ms, 99):.2f} ms"
    )


if __name__ == "__main__":
    main()
