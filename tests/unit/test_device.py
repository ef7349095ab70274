"""`serve --device`: parsing, what the server renders for CUDA, and no silent CPU fallback.

Everything here runs on a machine without a GPU (CI, this one): it is the path a user
without CUDA takes. The GPU itself is exercised by tests/e2e/test_gpu_e2e.py (marked
`gpu`) through scripts/gpu-check.sh. Real onnxruntime sessions and worker processes: the
CPU-only onnxruntime quietly builds a CPU session when asked for CUDA, and these tests
check that blindinfer refuses that session instead of serving on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import onnxruntime as ort
import pytest
from test_genai_config import BUILDER_CONFIG, ENTRIES, HOSTILE_SESSION_OPTIONS, _edited, _raw

from blindinfer.cli.main import _config, build_parser
from blindinfer.errors import UsageError
from blindinfer.protocol.genai_config import parse_genai_config, render, session_options
from blindinfer.runtime import device as device_module
from blindinfer.runtime.device import (
    DeviceUnavailableError,
    ort_providers,
    require_attestable,
    require_device,
    require_provider,
)
from blindinfer.runtime.errors import WorkerCrashedError
from blindinfer.runtime.generative import RuntimeOptions
from blindinfer.runtime.session import ModelSession
from blindinfer.runtime.workers import WorkerPool, _identity_model
from blindinfer.server.config import ServerConfig
from blindinfer.server.platforms import simulated_mrenclave

MiB = 1 << 20
CUDA_INSTALLED = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cpu_only = pytest.mark.skipif(
    CUDA_INSTALLED, reason="onnxruntime here has a CUDA provider: the CPU-only path is moot"
)


# -- configuration and command line -------------------------------------------------------


def _serve_config(*extra: str) -> ServerConfig:
    config = _config(build_parser().parse_args(["serve", "--simulation", *extra]))
    assert isinstance(config, ServerConfig)
    return config


def test_device_defaults_to_cpu_and_parses_cuda() -> None:
    assert _serve_config().device == "cpu"
    assert _serve_config("--device", "cuda").device == "cuda"
    assert _serve_config("--device=cpu").device == "cpu"


def test_unknown_device_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--device", "gpu"])
    assert exited.value.code == 2
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--device must be cpu or cuda"):
        ServerConfig(device="tpu")  # type: ignore[arg-type]


def test_the_device_is_pinned_by_the_measurement_and_cpu_keeps_its_value() -> None:
    """A GPU sees every tensor: a client's policy pins the device (the simulated measurement
    covers it), while every existing CPU policy stays valid (no key for cpu)."""
    cpu, cuda = ServerConfig(simulation=True), ServerConfig(simulation=True, device="cuda")
    assert "device" not in cpu.security_relevant()
    assert cuda.security_relevant()["device"] == "cuda"
    assert simulated_mrenclave(cpu) != simulated_mrenclave(cuda)


# -- what onnxruntime is asked for --------------------------------------------------------


def test_cuda_providers_cap_the_arena_at_the_workers_budget() -> None:
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    (name, options), cpu = ort_providers("cuda", 6 << 30)
    assert (name, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert options["gpu_mem_limit"] == str(6 << 30)
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert options["device_id"] == "0"
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="gpu_mem_limit"):
            ort_providers("cuda", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        ort_providers("rocm")  # type: ignore[arg-type]


def test_rendered_genai_config_for_cuda_is_the_servers_choice() -> None:
    """The model asked for another GPU, TensorRT and 512 threads; the server renders CUDA
    device 0 (og's default), its own arena cap, its threads, nothing of the model's."""
    config = parse_genai_config(
        _edited("model.decoder.session_options", HOSTILE_SESSION_OPTIONS), entries=ENTRIES
    )
    text = render(config, intra_op_threads=2, provider="cuda", gpu_mem_limit=3 << 30)
    options = json.loads(text)["model"]["decoder"]["session_options"]
    assert options["provider_options"] == [{"cuda": {"gpu_mem_limit": str(3 << 30)}}]
    assert options == session_options(intra_op_threads=2, provider="cuda", gpu_mem_limit=3 << 30)
    assert options["intra_op_num_threads"] == 2
    for needle in ("tensorrt", "device_id", "/etc/passwd", "512"):
        assert needle not in text.decode()
    plain = json.loads(render(parse_genai_config(_raw(BUILDER_CONFIG)), provider="cuda"))
    assert plain["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    # an arena cap only makes sense on CUDA, and only as a positive int
    for provider, limit in (("cpu", 1 << 30), ("cuda", 0), ("cuda", "1G")):
        with pytest.raises(ValueError, match="gpu_mem_limit"):
            session_options(provider=provider, gpu_mem_limit=limit)  # type: ignore[arg-type]


def test_generative_runtime_options_carry_the_servers_provider() -> None:
    assert RuntimeOptions().provider == "cpu"
    assert RuntimeOptions(provider="cuda", gpu_mem_limit=1 << 30).provider == "cuda"
    with pytest.raises(ValueError, match="provider"):
        RuntimeOptions(provider="tensorrt")  # type: ignore[arg-type]


# -- no silent fallback to the CPU --------------------------------------------------------


@needs_cpu_only
def test_a_cuda_session_that_comes_up_on_the_cpu_is_refused() -> None:
    """onnxruntime warns and builds a CPU session when CUDA is not there: blindinfer raises."""
    # with an arena cap: its registration with onnxruntime's environment fails first
    with pytest.raises(RuntimeError, match="could not start its CUDA provider"):
        ModelSession(_identity_model(), device="cuda", gpu_mem_limit=64 * MiB)
    # without one: the session onnxruntime built on the CPU is refused
    with pytest.raises(RuntimeError, match="could not start its CUDA provider"):
        ModelSession(_identity_model(), device="cuda")
    ModelSession(_identity_model(), device="cpu")  # the CPU path is unchanged


@needs_cpu_only
def test_serve_refuses_cuda_without_the_provider() -> None:
    with pytest.raises(DeviceUnavailableError, match="no CUDA provider") as refused:
        require_provider("cuda")
    assert isinstance(refused.value, UsageError)  # exit status 2 (cli/errors.py)
    assert "\n" not in str(refused.value)
    require_provider("cpu")
    require_device("cpu", workers=2, worker_memory_bytes=1 << 30)
    require_attestable("cpu", "tdx")


@needs_cpu_only
def test_the_probe_catches_a_provider_that_is_listed_but_cannot_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CUDA build on a machine without a usable GPU lists the provider but cannot start
    it. Here the list is doctored in this process only: the probe runs in its own process,
    the way a worker starts (memory limits, then a session), and says why it failed."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    with pytest.raises(DeviceUnavailableError, match="no usable CUDA device") as refused:
        require_device("cuda", workers=1, worker_memory_bytes=2 << 30)
    assert "could not start its CUDA provider" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_cuda_on_a_confidential_platform_is_refused_until_gpu_evidence_exists() -> None:
    """No GPU evidence can be presented yet: on TDX or SNP, tenant data would reach a GPU
    that no client can verify. Refused before any worker starts (serve.py)."""
    for kind in ("tdx", "snp", "gramine-sgx"):
        with pytest.raises(DeviceUnavailableError, match=f"--device cuda on {kind}"):
            require_attestable("cuda", kind)
    require_attestable("cuda", "simulation")


@needs_cpu_only
def test_a_worker_pool_on_cuda_does_not_start_on_the_cpu() -> None:
    """The worker's own warm-up session is built on CUDA: without it the worker fails to
    start (the pool refuses), it never serves on the CPU."""
    with pytest.raises(WorkerCrashedError):
        WorkerPool(
            workers=1,
            memory_limit_bytes=2 << 30,
            timeout_s=10,
            source=lambda _key: b"",
            device="cuda",
        )


def test_cuda_workers_keep_a_data_limit_but_no_address_space_limit() -> None:
    """CUDA reserves terabytes of address space at start: RLIMIT_AS would fail every CUDA
    worker. RLIMIT_DATA (private writable memory) still bounds the worker's CPU memory, and
    a CPU worker keeps both. Checked in fresh processes: limits cannot be lifted again."""
    script = textwrap.dedent(
        """
        import json, resource, sys
        import numpy as np
        from blindinfer.runtime.workers import _limit_memory
        _limit_memory(512 << 20, sys.argv[1])
        try:
            np.ones(1 << 30, np.uint8)  # 1 GiB of private writable memory
            refused = False
        except MemoryError:
            refused = True
        print(json.dumps({"as": resource.getrlimit(resource.RLIMIT_AS)[0],
                          "data": resource.getrlimit(resource.RLIMIT_DATA)[0],
                          "refused": refused}))
        """
    )
    seen = {}
    for device in ("cpu", "cuda"):
        done = subprocess.run(
            [sys.executable, "-c", script, device], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        seen[device] = json.loads(done.stdout)
    assert seen["cpu"] == {"as": 512 << 20, "data": 512 << 20, "refused": True}
    assert seen["cuda"]["as"] == -1  # RLIM_INFINITY
    assert seen["cuda"]["data"] == 512 << 20
    assert seen["cuda"]["refused"]


def test_every_workers_arena_must_fit_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arena caps that add up to more than the GPU has would bound nothing: refused at
    start. (Provider, probe and nvidia-smi stand in for a GPU of 8 GiB.)"""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(device_module, "_probe", lambda _limit: {"ok": True})
    monkeypatch.setattr(device_module, "gpu_memory_bytes", lambda: 8 << 30)
    with pytest.raises(DeviceUnavailableError, match="exceed the GPU's 8589934592 bytes"):
        require_device("cuda", workers=2, worker_memory_bytes=8 << 30)
    require_device("cuda", workers=2, worker_memory_bytes=4 << 30)


def test_an_arena_at_its_cap_is_a_memory_failure() -> None:
    """A capped onnxruntime arena (the CUDA one, runtime/device.py) does not say "Failed to
    allocate memory" but "Available memory of N is smaller than requested bytes of M": it
    must still be a memory failure (422 memory_limit, worker replaced), not a 400. The
    message is onnxruntime's own, from a real run against a capped arena; the CPU arena
    shares the BFC code with CUDA's. In a fresh process: the arena stays registered."""
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import onnxruntime as ort
        sys.path.insert(0, "tests")
        from support import hostile_models
        from blindinfer.runtime.errors import InvalidTensorError
        from blindinfer.runtime.workers import _error_reply
        arena = ort.OrtArenaCfg({"max_mem": 64 << 20, "arena_extend_strategy": 1})
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        ort.create_and_register_allocator_v2("CPUExecutionProvider", info, {}, arena)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.use_env_allocators", "1")
        options.log_severity_level = 4
        session = ort.InferenceSession(
            hostile_models.huge_allocation_model(256 << 20), sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        try:
            session.run(None, {"x": np.ones(1, np.float32)})
        except Exception as exc:  # wrapped the way ModelSession.run wraps it
            try:
                raise InvalidTensorError("inference_failed", "refused") from exc
            except InvalidTensorError as wrapped:
                print(json.dumps(_error_reply(wrapped)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert (reply["kind"], reply["asked"], reply["recycle"]) == ("memory", 256 << 20, True)
