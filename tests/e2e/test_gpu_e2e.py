"""`serve --device cuda` end to end: a real server process whose workers run on the GPU.

Two kinds of test live here:

- `gpu`-marked (skipped, with the reason, where onnxruntime has no CUDA provider or the
  machine no NVIDIA device; CI is CPU-only): a server started with `--device cuda` runs an
  MLP and a ResNet-shaped conv net, its outputs match in-process CPU onnxruntime within
  TF32's tolerance, its workers hold a CUDA context (no silent CPU fallback), and a request
  that needs more device memory than the worker's budget gets the same 422 memory_limit as
  on the CPU while the server goes on serving. scripts/gpu-check.sh runs them on a GPU.
- the refusal a user without CUDA meets: `serve --device cuda` exits with status 2 and one
  line on stderr (runs everywhere the CPU-only onnxruntime is installed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import blindinfer
from blindinfer.runtime.session import ModelSession
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support import hostile_models, onnx_models, vision_model

from .conftest import policy_for

pytestmark = pytest.mark.e2e

GiB = 1 << 30
CUDA = ("--device", "cuda")
CUDA_PROVIDER = "CUDAExecutionProvider" in ort.get_available_providers()


def _cuda_missing() -> str | None:
    if not CUDA_PROVIDER:
        return (
            "onnxruntime has no CUDA provider: install the gpu extra "
            "(docs/cli.md, 'The GPU path'; scripts/gpu-check.sh)"
        )
    if not Path("/dev/nvidiactl").exists():
        return "no NVIDIA GPU on this machine (/dev/nvidiactl is missing)"
    return None


MISSING = _cuda_missing()
# scripts/gpu-check.sh sets it: on the GPU machine a skip would hide a broken install
REQUIRED = os.environ.get("BLINDINFER_REQUIRE_GPU") == "1"
requires_cuda = pytest.mark.skipif(
    MISSING is not None and not REQUIRED, reason=f"no CUDA here: {MISSING}"
)

GPU_LIMITS = Limits(workers=2, worker_memory_bytes=4 * GiB, memory_budget_bytes=4 * GiB)
RELATIVE_TOLERANCE = 1e-2
"""CUDA runs float32 matrix products and convolutions in TF32 (10-bit mantissa): about 1e-3
relative error per product, well under 1e-2 of the largest output after a few layers.
A wrong kernel, layout or input is off by the output's own magnitude."""


def _server_args(limits: Limits) -> list[str]:
    return [
        "--simulation",
        "--device=cuda",
        f"--workers={limits.workers}",
        f"--worker-memory-bytes={limits.worker_memory_bytes}",
        f"--memory-budget-bytes={limits.memory_budget_bytes}",
    ]


@pytest.fixture(scope="module")
def gpu_server() -> Iterator[tuple[ServerProcess, blindinfer.Client]]:
    # CUDA's start (the probe, then each worker's context and cuDNN) takes seconds
    with start_server(_server_args(GPU_LIMITS), timeout=300) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(
                server.url,
                # the device is pinned by the measurement: a CPU server's policy would refuse
                policy=policy_for(ServerConfig(simulation=True, limits=GPU_LIMITS, device="cuda")),
                simulation=True,
            )
        with client:
            yield server, client


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and got.dtype == want.dtype
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as children:
            found |= {int(child) for child in children.read().split()}
    return found


def _holds_a_cuda_context(pid: int) -> bool:
    """A process with a CUDA context maps the NVIDIA device files (/dev/nvidia0, -uvm)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "/dev/nvidia" in maps


@pytest.mark.gpu
@requires_cuda
def test_models_run_on_the_gpu_and_match_in_process_cpu(
    gpu_server: tuple[ServerProcess, blindinfer.Client],
) -> None:
    server, client = gpu_server
    cases = [
        (
            "mlp",
            onnx_models.model_bytes(onnx_models.mlp_model()),
            {"x": np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)},
        ),
        ("conv-net", vision_model.conv_net_model(), vision_model.conv_net_feed(batch=4)),
    ]
    for name, model, feed in cases:
        client.upload_model(model, name=name)
        got = client.run_model(name, feed)
        want = ModelSession(model, device="cpu").run(feed)
        assert got.keys() == want.keys()
        for output, array in want.items():
            error = _relative_error(got[output], array)
            assert error <= RELATIVE_TOLERANCE, f"{name}.{output}: relative error {error:.2e}"
    workers = _children(server.process.pid)
    assert workers, "the server has no worker processes"
    assert any(_holds_a_cuda_context(pid) for pid in workers), "no worker runs on the GPU"


@pytest.mark.gpu
@requires_cuda
def test_device_memory_is_bounded_by_the_workers_budget(
    gpu_server: tuple[ServerProcess, blindinfer.Client],
) -> None:
    """16 GiB asked of a worker whose CUDA arena is capped at 4 GiB: refused like on the
    CPU (422 memory_limit), the worker is replaced, and the server goes on serving."""
    _, client = gpu_server
    good = onnx_models.model_bytes(onnx_models.mlp_model(seed=2))
    client.upload_model(good, name="good")
    feed = {"x": np.ones((1, 64), np.float32)}
    want = client.run_model("good", feed)["probabilities"]
    client.upload_model(hostile_models.huge_allocation_model(16 * GiB), name="huge")
    with pytest.raises(blindinfer.ServerError) as refused:
        client.run_model("huge", {"x": np.ones(1, np.float32)})
    assert (refused.value.status, refused.value.code) == (422, "memory_limit")
    again = client.run_model("good", feed)["probabilities"]
    assert _relative_error(again, want) <= RELATIVE_TOLERANCE


@pytest.mark.gpu
@requires_cuda
def test_one_workers_models_share_one_capped_arena() -> None:
    """The cap is the worker's, not each session's: after a 3 GiB request the worker's
    arena keeps those 3 GiB, so a second model's 3 GiB request does not fit beside them
    under a 4 GiB cap (422 memory_limit, the worker replaced), and fits once the fresh
    worker starts empty. With one arena per session both would have run: 6 GiB on a
    worker whose budget is 4."""
    limits = Limits(workers=1, worker_memory_bytes=4 * GiB, memory_budget_bytes=4 * GiB)
    with start_server(_server_args(limits), timeout=300) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(
                server.url,
                policy=policy_for(ServerConfig(simulation=True, limits=limits, device="cuda")),
                simulation=True,
            )
        with client:
            one = np.ones(1, np.float32)
            client.upload_model(hostile_models.huge_allocation_model(3 * GiB), name="first")
            client.upload_model(
                hostile_models.huge_allocation_model(3 * GiB + (1 << 20)), name="second"
            )
            client.run_model("first", {"x": one})
            with pytest.raises(blindinfer.ServerError) as refused:
                client.run_model("second", {"x": one})
            assert (refused.value.status, refused.value.code) == (422, "memory_limit")
            client.run_model("second", {"x": one})  # a fresh worker, an empty arena


@pytest.mark.skipif(CUDA_PROVIDER, reason="onnxruntime here has a CUDA provider")
def test_serve_refuses_cuda_without_it_in_one_line() -> None:
    """The path of every user without a GPU: no CPU fallback, no traceback, exit 2."""
    done = subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", "serve", "--simulation", "--port=0", *CUDA],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # never announced an address
    assert done.stderr.splitlines() == [
        "blindinfer serve: --device cuda: the installed onnxruntime has no CUDA provider; "
        "install blindinfer[gpu] in place of onnxruntime (docs/cli.md, 'The GPU path')"
    ]
