"""Latency through the attesting proxy against a direct attested client, in one run.

One simulation server, one proxy process (`python -m blindinfer.cli.proxy`), this process
as the client. On the same model (MLP 64-256-10, batch 1, binary tensors), with the same
request bytes, alternating blocks of 25 so that load drift hits every variant:
  (a) direct: blindinfer's attested client (pinned TLS, httpx) -> server
  (b) proxy:  plain HTTP (httpx, keep-alive) -> proxy -> pinned TLS -> server
  (c) proxy with tritonclient (its own encoding; for orientation, not a like-for-like)
and upload throughput of a ~32 MB model, direct and through the proxy.
Prints median and p99 and the per-request overhead (b - a); target < 1 ms on loopback.
Run: `.venv/bin/python bench/bench_proxy.py` (`--quick` for fewer iterations). Nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from timing import interleaved, percentile  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.cli.proxy import READY_PREFIX  # noqa: E402
from blindinfer.client.transport import NO_DELAY  # noqa: E402
from blindinfer.protocol.inference import (  # noqa: E402
    encode_infer_request,
    parse_header_length,
    parse_infer_response,
)
from blindinfer.protocol.limits import TensorLimits  # noqa: E402
from blindinfer.server.config import ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import onnx_models  # noqa: E402


def start_proxy(upstream: str, policy_path: Path) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable,
        "-m",
        "blindinfer.cli.proxy",
        "--policy",
        str(policy_path),
        "--upstream",
        upstream,
        "--listen",
        "127.0.0.1:0",
        "--simulation",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(READY_PREFIX) or "(attested)" not in line:
        process.kill()
        raise RuntimeError(f"the proxy did not start: {line!r}")
    return process, line[len(READY_PREFIX) :].split(" ")[0]


def big_model(megabytes: int) -> bytes:
    side = int((megabytes * (1 << 20) / 4) ** 0.5)
    return onnx_models.model_bytes(onnx_models.mlp_model(in_features=side, hidden=side))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 100 if args.quick else 1000
    mrenclave = simulated_mrenclave(ServerConfig(simulation=True))
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(mrenclave=(mrenclave,), mrsigner=(SIMULATION_MRSIGNER,))
    )
    model = onnx_models.model_bytes(onnx_models.mlp_model())
    feed = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}
    body, headers = encode_infer_request(feed, outputs=None, binary=True)
    limits = TensorLimits()
    with tempfile.TemporaryDirectory() as tmp, start_server(["--simulation"]) as server:
        policy_path = Path(tmp) / "policy.toml"
        policy_path.write_text(
            f'[sgx]\nmrenclave = ["{mrenclave.hex()}"]\n'
            f'mrsigner = ["{SIMULATION_MRSIGNER.hex()}"]\n'
        )
        proxy, proxy_url = start_proxy(server.url, policy_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            direct = blindinfer.connect(server.url, policy=policy, simulation=True)
        local = httpx.Client(
            base_url=proxy_url, transport=httpx.HTTPTransport(socket_options=NO_DELAY)
        )
        try:
            direct.upload_model(model, name="mlp")
            path = "/v2/models/mlp/infer"

            def run(client: httpx.Client) -> Callable[[], object]:
                def once() -> object:
                    response = client.post(path, content=body, headers=headers)
                    assert response.status_code == 200, response.text
                    length = parse_header_length(
                        response.headers.get("inference-header-content-length")
                    )
                    return parse_infer_response(response.content, length, limits)

                return once

            variants: dict[str, Callable[[], object]] = {
                "(a) direct attested client": run(direct._http),
                "(b) through the proxy": run(local),
            }
            triton = None
            try:
                import tritonclient.http as triton_http  # type: ignore[import-untyped]

                triton = triton_http.InferenceServerClient(proxy_url.split("://", 1)[1])
                x = triton_http.InferInput("x", [1, 64], "FP32")
                x.set_data_from_numpy(feed["x"], binary_data=True)
                wanted = [triton_http.InferRequestedOutput("probabilities", binary_data=True)]
                variants["(c) tritonclient via proxy"] = lambda: triton.infer(
                    "mlp", [x], outputs=wanted
                )
            except ImportError:
                print("tritonclient not installed: skipping (c)")
            results = interleaved(variants, n)
            print(f"MLP 64-256-10 batch 1, {n} requests each, interleaved blocks of 25")
            for name, samples in results.items():
                print(
                    f"  {name:30s} median {statistics.median(samples):6.3f} ms   "
                    f"p99 {percentile(samples, 99):6.3f} ms"
                )
            a = results["(a) direct attested client"]
            b = results["(b) through the proxy"]
            overhead = statistics.median(b) - statistics.median(a)
            verdict = "meets" if overhead < 1.0 else "MISSES"
            print(f"  proxy overhead (b - a), median: {overhead:+.3f} ms ({verdict} < 1 ms)")

            upload = big_model(8 if args.quick else 32)
            rounds = 2 if args.quick else 5

            def upload_via(client: httpx.Client) -> float:
                start = time.perf_counter()
                response = client.put(
                    "/v2/repository/models/big/upload",
                    content=upload,
                    headers={"content-type": "application/octet-stream"},
                    timeout=300,
                )
                elapsed = time.perf_counter() - start
                assert response.status_code in (200, 201), response.text
                assert client.delete("/v2/repository/models/big").status_code == 200
                return len(upload) / elapsed / (1 << 20)

            speeds: dict[str, list[float]] = {"direct": [], "proxy": []}
            for _ in range(rounds):
                speeds["direct"].append(upload_via(direct._http))
                speeds["proxy"].append(upload_via(local))
            print(f"upload of {len(upload) / (1 << 20):.1f} MB, {rounds} rounds each")
            for name, values in speeds.items():
                print(f"  {name:7s} median {statistics.median(values):7.1f} MB/s")
        finally:
            local.close()
            direct.close()
            if triton is not None:
                triton.close()
            proxy.terminate()
            proxy.wait(10)


if __name__ == "__main__":
    main()
