"""run_model over the two transports of the Python client, on ONE server, interleaved.

One simulation server started with `--grpc-port`; two clients of this tree attested the
same way: `connect(url, ...)` (HTTPS: the pinned fast path, client/pinned_http.py) and
`connect(url, ..., transport="grpc")` (OIP v2 gRPC, client/grpc_transport.py). The same
model and input go through both in alternating blocks, so that the machine's load hits
both alike; latency per request (the caller's wall time of one `run_model`), median and
p90, and the client process's CPU time per request (all its threads: grpc's own threads
included; the server is another process). Before timing, both transports' outputs are
checked to be bit-identical.

Models: the MLP 64-256-10 at batch 1 (nearly all fixed cost) and at batch 256 (a 64 KiB
request), and MiniLM-L6 batch 1 x 128 (a 198 KB answer), as in bench_fixed_cost.py.

Run: `.venv/bin/python bench/bench_transports.py` (`--quick`, `--no-minilm`,
`--iterations N`). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_fixed_cost import models  # noqa: E402
from timing import interleaved, machine, percentile  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.server.config import ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import onnx_models  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def connect(url: str, transport: str) -> blindinfer.Client:
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(ServerConfig(simulation=True)),),
            mrsigner=(SIMULATION_MRSIGNER,),
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(url, policy=policy, simulation=True, transport=transport)


def workloads(include_minilm: bool) -> list[tuple[str, bytes, dict[str, np.ndarray]]]:
    chosen = models(include_minilm)
    rng = np.random.default_rng(1)
    batch = {"x": rng.standard_normal((256, 64)).astype(np.float32)}
    chosen.insert(
        1, ("mlp-64-256-10 b256", onnx_models.model_bytes(onnx_models.mlp_model()), batch)
    )
    return chosen


class CpuMeter:
    """Wraps a call to add up the client process's CPU seconds spent in it."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.call = call
        self.seconds = 0.0
        self.calls = 0

    def __call__(self) -> object:
        start = time.process_time()
        result = self.call()
        self.seconds += time.process_time() - start
        self.calls += 1
        return result

    @property
    def ms_per_call(self) -> float:
        return self.seconds / max(1, self.calls) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 requests per transport")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args()
    iterations = args.iterations or (100 if args.quick else 600)
    port = free_port()
    print(machine())
    print(f"one server (--simulation --grpc-port {port}); {iterations} requests per cell,")
    print("transports interleaved in blocks of 25; ms per run_model (median, p90) and the")
    print("client process's CPU ms per run_model (mean, all its threads)\n")
    rows: list[tuple[str, list[float], list[float], float, float]] = []
    with start_server(["--simulation", f"--grpc-port={port}"]) as server:
        https = connect(server.url, "https")
        grpc_client = connect(server.url, "grpc")
        with https, grpc_client:
            for label, model, feed in workloads(not args.no_minilm):
                info = https.upload_model(model)
                want = https.run_model(info.model_id, feed)
                got = grpc_client.run_model(info.model_id, feed)
                assert list(got) == list(want)
                assert all(got[k].tobytes() == want[k].tobytes() for k in want), label
                meters = {
                    "https": CpuMeter(lambda i=info, f=feed: https.run_model(i.model_id, f)),
                    "grpc": CpuMeter(lambda i=info, f=feed: grpc_client.run_model(i.model_id, f)),
                }
                samples = interleaved(dict(meters), iterations)
                cpu = (meters["https"].ms_per_call, meters["grpc"].ms_per_call)
                rows.append((label, samples["https"], samples["grpc"], *cpu))
    print(
        "| workload | https median | https p90 | grpc median | grpc p90 | grpc/https median "
        "| client CPU https | client CPU grpc |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, over_https, over_grpc, cpu_https, cpu_grpc in rows:
        a, b = statistics.median(over_https), statistics.median(over_grpc)
        print(
            f"| {label} | {a:.3f} | {percentile(over_https, 90):.3f} | {b:.3f} | "
            f"{percentile(over_grpc, 90):.3f} | {b / a:.2f}x | {cpu_https:.3f} | {cpu_grpc:.3f} |"
        )


if __name__ == "__main__":
    main()
