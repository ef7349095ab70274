"""A loaded model costs what was measured when it loaded, whatever its runs allocate.

The registry budgets models by the worker's resident-memory growth measured at load
(store/registry.py): that stays true only if what a run allocates (here 64 MiB of
intermediate tensors per run, far more than the model's 4 MiB of weights) is given back
when the run ends. onnxruntime's CPU arena keeps it: even shrunk after every run
(`memory.enable_memory_arena_shrinkage`), its first region, sized by the first run,
stays (measured: 92 MiB resident for a model measured at 13 MiB). So the workers' CPU
sessions run without it (runtime/session.py), and this test fails if one ever has it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from blindinfer.runtime.session import session_options
from blindinfer.runtime.workers import WorkerPool
from support.onnx_models import mlp_model, model_bytes
from support.procmem import own_rss_bytes

MIB = 1 << 20
WIDE = model_bytes(mlp_model(in_features=256, hidden=4096, out_features=8))
"""4 MiB of weights; a batch of 4096 rows makes 64 MiB intermediate tensors (4096 x 4096)."""
ROWS = 4096
SLACK = 32 * MIB
"""What malloc keeps of the worker's own buffers (the model bytes received at load, one
run's input and reply frames: ~20 MiB measured here): well under the 64 MiB that one
run's intermediates add to an arena that keeps them (~90 MiB of growth measured)."""


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    models = {"wide": WIDE}
    with WorkerPool(
        workers=1,
        memory_limit_bytes=3 << 30,
        timeout_s=30.0,
        intra_op_threads=1,
        source=models.__getitem__,
    ) as created:
        yield created


def _worker_rss(pool: WorkerPool) -> int:
    pid = pool.stats()[0].pid
    assert pid is not None
    return own_rss_bytes(pid)


def test_cpu_sessions_run_without_the_arena() -> None:
    assert not session_options().enable_cpu_mem_arena
    assert not session_options(intra_op_threads=1, spin_us=0).enable_cpu_mem_arena


def test_measured_cost_bounds_resident_growth_across_runs(pool: WorkerPool) -> None:
    x = np.random.default_rng(0).standard_normal((ROWS, 256)).astype(np.float32)
    before = _worker_rss(pool)
    loaded = pool.validate_and_load("wide", WIDE)
    assert loaded.memory_bytes > 0
    growth = []
    for _ in range(6):
        out = pool.run("wide", {"x": x})["probabilities"]
        assert out.shape == (ROWS, 8)
        growth.append(_worker_rss(pool) - before)
    print(f"cost {loaded.memory_bytes / MIB:.1f} MiB; RSS growth {[g // MIB for g in growth]} MiB")
    assert max(growth) <= loaded.memory_bytes + SLACK


def test_session_options_are_the_workers_settings() -> None:
    """The one place the workers' (and the benchmark's) options come from."""
    options = session_options(intra_op_threads=3, spin_us=50)
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.intra_op.spin_duration_us") == "50"
    assert options.log_severity_level == 4
    never = session_options(spin_us=0)
    assert never.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options().intra_op_num_threads == 0  # all cores unless told otherwise
    with pytest.raises(ValueError, match="must not be negative"):
        session_options(spin_us=-1)
