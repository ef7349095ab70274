"""Side-by-side latency of in-process onnxruntime and blindinfer over attested TLS.

In ONE run on the same machine, for each model (MiniLM batch 1 x 128 tokens, a small MLP):
  (a) onnxruntime in-process `session.run`
  (b) the same model through the blindinfer client over attested TLS, sequential
  (c) 8 concurrent clients (one attested connection each), aggregate throughput
  (d) `connect` including full attestation (fresh nonce, dcap-qvl, binding, policy)
  (p) the peer: the same model on MLServer 1.7 (bench/peer_mlserver.py: its own virtualenv,
      an onnxruntime runtime, V2 JSON over plain HTTP on loopback), sequential and 8
      concurrent clients, interleaved with (a) and (b)
Prints median and p99 and the ratios. Run: `.venv/bin/python bench/bench_inference.py`
(`--quick` for fewer iterations; `--mlserver-python` names MLServer's interpreter, the peer
is left out when there is none). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from peer_mlserver import MLServerClient, mlserver  # noqa: E402
from timing import interleaved, machine, percentile, timed  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.server.config import ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import onnx_models  # noqa: E402

ORT = "onnxruntime in-process"
OURS = "blindinfer, attested TLS"
PEER = "MLServer 1.7, HTTP JSON"
# Models whose outputs include a large one: also measured asking for the small one only, so
# that the peer's fixed cost shows apart from its JSON encoding of 49,152 floats.
ONE_OUTPUT = {"minilm-l6": "sentence_embedding"}


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
    try:
        calls = [functools.partial(c.run_model, model, feed) for c in connections]
        return throughput(calls, seconds)
    finally:
        for c in connections:
            c.close()


def throughput(calls: Sequence[Callable[[], object]], seconds: float) -> float:
    """Requests per second of all `calls` together, each looping on its own thread."""
    for call in calls:
        call()
    counts = [0] * len(calls)
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            try:
                calls[i]()
            except Exception as exc:  # said out loud: the rate below lacks this client
                print(f"a concurrent client stopped: {type(exc).__name__}: {exc}")
                return
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def mlserver_python(given: str | None) -> Path | None:
    """MLServer's interpreter: --mlserver-python, $BENCH_MLSERVER_PYTHON, or the venv that
    bench/requirements-mlserver.txt describes; None (peer left out) when there is none."""
    candidate = given or os.environ.get("BENCH_MLSERVER_PYTHON") or "/tmp/mlserver-venv/bin/python"
    path = Path(candidate)
    if path.exists():
        return path
    if given:
        raise SystemExit(f"--mlserver-python {given}: no such interpreter")
    print("MLServer left out: no interpreter (see bench/requirements-mlserver.txt)")
    return None


def mlserver_throughput(
    url: str, model: str, feed: dict[str, np.ndarray], clients: int, seconds: float
) -> float:
    peers = [MLServerClient(url) for _ in range(clients)]
    try:
        return throughput([functools.partial(p.infer, model, feed) for p in peers], seconds)
    finally:
        for p in peers:
            p.close()


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
    parser.add_argument("--mlserver-python", help="MLServer's interpreter (the peer)")
    args = parser.parse_args()
    n = 50 if args.quick else 300
    seconds = 3.0 if args.quick else 10.0
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(ServerConfig(simulation=True)),),
            mrsigner=(SIMULATION_MRSIGNER,),
        )
    )
    chosen = models(not args.no_minilm)
    peer_python = mlserver_python(args.mlserver_python)
    peer = (
        mlserver(peer_python, {label.split()[0]: model for label, model, _ in chosen})
        if peer_python is not None
        else nullcontext(None)
    )
    # (model, stack, latency samples in ms, 8-client req/s, in-process single-stream req/s)
    rows: list[tuple[str, str, list[float], float | None, float]] = []
    with start_server(["--simulation"]) as server, peer as peer_url:
        connect_ms = timed(
            lambda: connect(server.url, policy).close(), 30 if args.quick else 100, warmup=5
        )
        peer_client = MLServerClient(peer_url) if peer_url is not None else None
        peer_version = peer_client.server_version() if peer_client is not None else ""
        with connect(server.url, policy) as client:
            for label, model, feed in chosen:
                name = label.split()[0]
                session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
                info = client.upload_model(model, name=name)
                only = ONE_OUTPUT.get(name)
                variants: dict[str, Callable[[], object]] = {
                    ORT: functools.partial(session.run, None, feed),
                    OURS: functools.partial(client.run_model, info.model_id, feed),
                }
                if only is not None:
                    variants[f"{OURS}, {only} only"] = functools.partial(
                        client.run_model, info.model_id, feed, outputs=[only]
                    )
                if peer_client is not None:
                    variants[PEER] = functools.partial(peer_client.infer, name, feed)
                    if only is not None:
                        variants[f"{PEER}, {only} only"] = functools.partial(
                            peer_client.infer, name, feed, outputs=[only]
                        )
                samples = interleaved(variants, n)
                rps = 1000 / statistics.median(samples[ORT])
                concurrent = {
                    OURS: concurrent_throughput(server.url, policy, info.model_id, feed, 8, seconds)
                }
                if peer_url is not None:
                    concurrent[PEER] = mlserver_throughput(peer_url, name, feed, 8, seconds)
                rows += [
                    (label, stack, stack_samples, concurrent.get(stack), rps)
                    for stack, stack_samples in samples.items()
                ]
                client.delete_model(info.model_id)
        if peer_client is not None:
            peer_client.close()
    print(machine())
    print(
        "| model | stack | median / p99 ms | / in-process | 8 clients req/s "
        "| / in-process single stream |"
    )
    print("|---|---|---|---|---|---|")
    for label, stack, samples_ms, c, rps in rows:
        median = statistics.median(samples_ms)
        base = next(s for m, k, s, _, _ in rows if m == label and k == ORT)
        ratio = median / statistics.median(base)
        clients8 = "" if c is None else f"{c:.1f}"
        versus = f"{c / rps:.2f}" if c is not None else ""
        if stack == ORT:
            versus = f"(single stream {rps:.1f} req/s)"
        print(
            f"| {label} | {stack} | {median:.3f} / {percentile(samples_ms, 99):.3f} "
            f"| {ratio:.2f}x | {clients8} | {versus} |"
        )
    print(
        f"(d) connect incl. attestation: median {statistics.median(connect_ms):.2f} ms, "
        f"p99 {percentile(connect_ms, 99):.2f} ms"
    )
    if peer_version:
        print(
            f"(p) {peer_version}, its own virtualenv, the onnxruntime runtime of "
            "bench/mlserver_onnxruntime.py (default session options, as (a)), its default "
            "settings (one parallel inference worker), V2 JSON over plain HTTP on loopback: "
            "MLServer's REST API has no binary tensor extension"
        )


if __name__ == "__main__":
    main()
