"""Latency through the attesting proxy against a direct attested client, in one run.

One simulation server, one proxy process (`python -m blindinfer.cli.proxy`), this process
as the client. On the same model (MLP 64-256-10, batch 1, binary tensors), with the same
request bytes, alternating blocks of 25 so that load drift hits every variant:
  (a) direct: blindinfer's attested client (pinned TLS, httpx) -> server
  (b) proxy:  plain HTTP (httpx, keep-alive) -> proxy -> pinned TLS -> server
  (c) proxy with tritonclient (its own encoding; for orientation, not a like-for-like)
and upload throughput of a ~32 MB model, direct and through the proxy.
Prints median and p99 and the per-request overhead (b - a); target <= +0.3 ms on loopback.
Run: `.venv/bin/python bench/bench_proxy.py` (`--quick` for fewer iterations). Nothing
here asserts a time. `--baseline-src DIR` also runs (b0): a proxy from another checkout (a
`git worktree` of HEAD) in the same interleaved run, for before/after ratios.
"""

from __future__ import annotations

import argparse
import os
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


def start_proxy(
    upstream: str, policy_path: Path, source: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    """A proxy process from this tree, or from `source` (another checkout's root)."""
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source / "src")}
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
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(READY_PREFIX) or "(attested)" not in line:
        process.kill()
        raise RuntimeError(f"the proxy did not start: {line!r}")
    return process, line[len(READY_PREFIX) :].split(" ")[0]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _counting(fn: Callable[[], object]) -> tuple[Callable[[], object], list[int]]:
    """`fn` and a counter of its calls (warm-up included)."""
    count = [0]

    def counted() -> object:
        count[0] += 1
        return fn()

    return counted, count


def big_model(megabytes: int) -> bytes:
    side = int((megabytes * (1 << 20) / 4) ** 0.5)
    return onnx_models.model_bytes(onnx_models.mlp_model(in_features=side, hidden=side))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        metavar="DIR",
        help="also run a proxy from this checkout (e.g. `git worktree add --detach /tmp/head "
        "HEAD`), interleaved with this tree's: before/after in one run (same server)",
    )
    parser.add_argument("--no-upload", action="store_true", help="skip the upload throughput")
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
        baseline = None
        if args.baseline_src is not None:
            baseline, baseline_url = start_proxy(server.url, policy_path, args.baseline_src)
            baseline_local = httpx.Client(
                base_url=baseline_url, transport=httpx.HTTPTransport(socket_options=NO_DELAY)
            )
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
            if baseline is not None:
                variants["(b0) through the baseline proxy"] = run(baseline_local)
            triton = None
            try:
                if baseline is not None:  # each proxy's CPU per request: the same client
                    raise ImportError
                import tritonclient.http as triton_http  # type: ignore[import-untyped]

                triton = triton_http.InferenceServerClient(proxy_url.split("://", 1)[1])
                x = triton_http.InferInput("x", [1, 64], "FP32")
                x.set_data_from_numpy(feed["x"], binary_data=True)
                wanted = [triton_http.InferRequestedOutput("probabilities", binary_data=True)]
                variants["(c) tritonclient via proxy"] = lambda: triton.infer(
                    "mlp", [x], outputs=wanted
                )
            except ImportError:
                print("tritonclient not installed or --baseline-src given: skipping (c)")
            # each proxy process and the variants it serves
            processes = {"proxy": (proxy, [v for v in variants if "via proxy" in v])}
            processes["proxy"][1].append("(b) through the proxy")
            if baseline is not None:
                processes["baseline proxy"] = (baseline, ["(b0) through the baseline proxy"])
            counted = {name: _counting(fn) for name, fn in variants.items()}
            cpu_before = {name: _cpu_seconds(p.pid) for name, (p, _) in processes.items()}
            results = interleaved({name: fn for name, (fn, _) in counted.items()}, n)
            print(f"MLP 64-256-10 batch 1, {n} requests each, interleaved blocks of 25")
            for name, samples in results.items():
                print(
                    f"  {name:30s} median {statistics.median(samples):6.3f} ms   "
                    f"p99 {percentile(samples, 99):6.3f} ms"
                )
            for name, (process, served) in processes.items():
                cpu = _cpu_seconds(process.pid) - cpu_before[name]
                calls = sum(counted[v][1][0] for v in served)
                print(
                    f"  {name:15s} process CPU {cpu / calls * 1000:6.3f} ms per request "
                    f"({calls} requests; less sensitive to load than latency)"
                )
            a = results["(a) direct attested client"]
            b = results["(b) through the proxy"]
            overhead = statistics.median(b) - statistics.median(a)
            verdict = "meets" if overhead <= 0.3 else "MISSES"
            print(f"  proxy overhead (b - a), median: {overhead:+.3f} ms ({verdict} <= +0.3 ms)")
            if baseline is not None:
                b0 = results["(b0) through the baseline proxy"]
                before = statistics.median(b0) - statistics.median(a)
                ratio = f"{overhead / before:.2f}" if before > 0 else "n/a"
                print(
                    f"  baseline proxy overhead (b0 - a), median: {before:+.3f} ms; "
                    f"this tree's / baseline's: {ratio}"
                )
            if args.no_upload:
                return

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
            if baseline is not None:
                baseline_local.close()
                baseline.terminate()
                baseline.wait(10)
            if triton is not None:
                triton.close()
            proxy.terminate()
            proxy.wait(10)


if __name__ == "__main__":
    main()
