"""Where models run: the CPU, or one NVIDIA GPU through onnxruntime's CUDA provider.

The device is the server operator's choice (`serve --device`), never a model's: tensor
sessions get their providers from `ort_providers`, generative models a genai_config whose
provider the server renders (protocol/genai_config.py). Models still run in the worker
processes of runtime/workers.py, with the same isolation; what changes on CUDA:

- **no silent fallback**: onnxruntime quietly builds a CPU-only session when its CUDA
  provider cannot start (missing CUDA or cuDNN libraries, no device); `check_active` turns
  that into an error, and `serve` probes the device in a worker-like process before it
  listens (`require_device`): a server asked for CUDA either runs on CUDA or does not start.
- **attestation**: on a confidential platform CUDA is refused (`require_attestable`) until
  the server can present the GPU's evidence that clients already know how to verify.
- **memory**: CUDA reserves terabytes of virtual address space at initialisation, so the
  worker's RLIMIT_AS (the CPU path's bound) would make every CUDA start fail. On CUDA the
  worker keeps RLIMIT_DATA instead (private writable memory: heap, numpy, onnxruntime's
  CPU buffers; the reservations are PROT_NONE and not counted), and the device memory of
  each worker is capped by one CUDA arena shared by all its sessions (`share_cuda_arena`;
  each session's own `gpu_mem_limit` too), set to the worker's memory budget: a model or
  request that needs more fails with the same MemoryLimitError as on the CPU. Outside
  that arena: the CUDA context and the cuBLAS / cuDNN handles (a few hundred MiB per
  worker).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import subprocess
import sys
from typing import Any, Final, Literal

from blindinfer.errors import UsageError

__all__ = [
    "DEVICES",
    "Device",
    "DeviceUnavailableError",
    "check_active",
    "ort_providers",
    "prepare_session",
    "require_attestable",
    "require_device",
    "require_provider",
]

Device = Literal["cpu", "cuda"]
DEVICES: Final[tuple[Device, ...]] = ("cpu", "cuda")

CUDA_PROVIDER: Final = "CUDAExecutionProvider"
NO_CUDA: Final = (
    "onnxruntime could not start its CUDA provider (no GPU, or CUDA / cuDNN libraries missing)"
)
PROBE_TIMEOUT_S: Final = 180.0
"""Starting CUDA and loading cuDNN / cuBLAS takes seconds; a hung driver must not hang
`serve` forever."""


class DeviceUnavailableError(UsageError):
    """`--device cuda` on a machine (or platform) that cannot run it: `serve` refuses to
    start with this one line (exit status 2, docs/cli.md) instead of running on the CPU."""


def ort_providers(device: Device, gpu_mem_limit: int | None = None) -> list[Any]:
    """onnxruntime's `providers` for a session on `device`.

    CUDA: device 0; its arena capped at `gpu_mem_limit` bytes and grown by what is asked
    (the default doubling would hit the cap long before the memory is used); cuDNN picks
    convolution algorithms by heuristics instead of trying each one, which allocates
    large workspaces and makes the first run of every shape slow. The CPU provider stays
    in the list for the nodes CUDA has no kernel for (shape arithmetic): that is
    onnxruntime's normal partitioning, not a fallback of the session.
    """
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    options = {
        "device_id": "0",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    if gpu_mem_limit is not None:
        if type(gpu_mem_limit) is not int or gpu_mem_limit <= 0:
            raise ValueError(f"gpu_mem_limit must be a positive int, got {gpu_mem_limit!r}")
        options["gpu_mem_limit"] = str(gpu_mem_limit)
    return [(CUDA_PROVIDER, options), "CPUExecutionProvider"]


def check_active(session: Any, device: Device) -> None:
    """Raises when a session meant for CUDA came up without it (onnxruntime's quiet CPU
    fallback when its CUDA provider cannot load)."""
    if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise RuntimeError(NO_CUDA)


@functools.cache
def preload_cuda_libraries() -> None:
    """Loads CUDA and cuDNN from the nvidia-* wheels the `gpu` extra installs (onnxruntime's
    own helper; a machine-wide CUDA is found by the loader as usual)."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        # a library it cannot find is not an error here: check_active reports the session
        with contextlib.suppress(Exception):
            preload()


_shared_arena_cap: list[int] = []
"""The cap of this process's shared CUDA arena, once registered (one per process)."""


def share_cuda_arena(limit: int) -> None:
    """One CUDA memory arena for every session of this process, capped at `limit` bytes.

    Each session's own `gpu_mem_limit` caps that session only: a worker holding five models
    could use five times its budget. An arena registered with onnxruntime's environment and
    used by every session (`session.use_env_allocators`) caps them together, the way
    RLIMIT_DATA caps the worker's host memory. Registered once; a second, different cap in
    the same process is a bug, refused."""
    if _shared_arena_cap:
        if _shared_arena_cap[0] != limit:
            raise RuntimeError("this process's CUDA arena already has another cap")
        return
    import onnxruntime as ort

    arena = ort.OrtArenaCfg({"max_mem": limit, "arena_extend_strategy": 1})  # as requested
    memory = ort.OrtMemoryInfo(
        "Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    try:
        ort.create_and_register_allocator_v2(CUDA_PROVIDER, memory, {"device_id": "0"}, arena)
    except Exception as exc:  # the CPU-only build, or CUDA's libraries or device missing
        raise RuntimeError(NO_CUDA) from exc
    _shared_arena_cap.append(limit)


def prepare_session(options: Any, device: Device, gpu_mem_limit: int | None) -> None:
    """Session options for `device`: on CUDA, its libraries loaded and, with a cap, the
    process's shared arena (`share_cuda_arena`) used by this session."""
    if device != "cuda":
        return
    preload_cuda_libraries()
    if gpu_mem_limit is not None:
        share_cuda_arena(gpu_mem_limit)
        options.add_session_config_entry("session.use_env_allocators", "1")


def require_provider(device: Device) -> None:
    """The cheap check, before anything starts: onnxruntime's CUDA provider is installed
    (the `gpu` extra, not the CPU-only onnxruntime)."""
    if device == "cpu":
        return
    if device != "cuda":
        raise DeviceUnavailableError(f"--device must be one of {', '.join(DEVICES)}")
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        raise DeviceUnavailableError(
            "--device cuda: the installed onnxruntime has no CUDA provider; install "
            "blindinfer[gpu] in place of onnxruntime (docs/cli.md, 'The GPU path')"
        )


def require_device(device: Device, *, workers: int, worker_memory_bytes: int) -> None:
    """Refuses to start (DeviceUnavailableError, one line) unless `device` can be served:
    for CUDA, onnxruntime's CUDA provider; a device that starts a session under the
    worker's limits (probed in a separate process, as a worker would start); and, where
    nvidia-smi says how much memory the GPU has, room for every worker's arena cap."""
    if device == "cpu":
        return
    require_provider(device)
    reply = _probe(worker_memory_bytes)
    if not reply.get("ok"):
        reason = str(reply.get("message") or "the probe failed")[:300]
        raise DeviceUnavailableError(f"--device cuda: no usable CUDA device: {reason}")
    total = gpu_memory_bytes()
    if total is not None and workers * worker_memory_bytes > total:
        raise DeviceUnavailableError(
            f"--device cuda: {workers} workers x --worker-memory-bytes "
            f"{worker_memory_bytes} exceed the GPU's {total} bytes; lower either"
        )


def require_attestable(device: Device, platform_kind: str) -> None:
    """On a confidential platform a device must be covered by the evidence clients verify.

    blindinfer's clients verify NVIDIA H100 evidence (`[gpu]` in a policy), but the server
    cannot collect it yet; on a TDX or SNP guest, tenant data would reach a GPU no client
    can verify to be in confidential-computing mode. So CUDA runs with `--simulation` only
    until the server presents GPU evidence."""
    if device != "cpu" and platform_kind != "simulation":
        raise DeviceUnavailableError(
            f"--device {device} on {platform_kind}: blindinfer cannot present NVIDIA GPU "
            "evidence yet, so clients could not verify the GPU; serve with --device cpu"
        )


def _probe(memory_limit: int) -> dict[str, Any]:
    """Runs `python -m blindinfer.runtime.device` (below): a worker's start on CUDA."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "blindinfer.runtime.device", str(memory_limit)],
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "message": f"starting CUDA took over {PROBE_TIMEOUT_S:.0f} s"}
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else None
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        return {"ok": False, "message": f"the probe process exited with {done.returncode}"}
    return reply


def gpu_memory_bytes() -> int | None:
    """Memory of GPU 0 per nvidia-smi; None when nvidia-smi is not there or says nothing."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, "--id=0", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return int(done.stdout.decode().strip().splitlines()[0]) << 20  # MiB
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def _probe_main(memory_limit: int) -> dict[str, Any]:
    """A worker's start on CUDA, in this process: its memory limits, then a session."""
    from blindinfer.runtime.errors import InvalidModelError
    from blindinfer.runtime.session import ModelSession
    from blindinfer.runtime.workers import _identity_model, _limit_memory

    _limit_memory(memory_limit, device="cuda")
    try:
        ModelSession(_identity_model(), device="cuda", gpu_mem_limit=memory_limit)
    except Exception as exc:
        # onnxruntime's words where ModelSession wrapped them, else blindinfer's own line
        cause = exc.__cause__ if isinstance(exc, InvalidModelError) else None
        text = str(cause or exc).strip().splitlines()
        return {"ok": False, "message": text[0][:300] if text else type(exc).__name__}
    return {"ok": True}


if __name__ == "__main__":
    result = _probe_main(int(sys.argv[1]))
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 1)
