"""Which onnxruntime setting makes a worker's MiniLM run slower than a default session?

Each variant is a session in a process of its own (so that process-wide settings can
differ: the worker's memory limits and malloc tuning, `_limit_memory`), driven over a
pipe: the parent asks one process at a time for a block of timed `session.run` calls
(timed inside that process: the session's own cost, no pipe), interleaved in blocks,
each round starting with the next variant, so that the machine's load hits every variant
alike. The other processes sleep on their pipe meanwhile (their pools are idle). CPU time
and page faults per run are reported too: load disturbs them far less than wall time.

Variants (`worker` = `session_options()` of runtime/session.py, what the workers run):
  default            ort.SessionOptions() as a user writes it (arena on, all cores)
  worker             the worker's options, in a process with the worker's limits
  worker+arena       the same with the CPU arena on
  worker+arena+shrink  arena on, and `memory.enable_memory_arena_shrinkage` "cpu:0" per run
  worker tN          intra-op threads N; spin variants: spin off / 50 us / default
  ...

`--memory`: what the arena variants keep resident after runs (the registry budgets what
was measured at load), in a worker-like process.

Run: `.venv/bin/python bench/bench_ort_settings.py` (`--quick` for fewer iterations,
`--only a,b` for a subset, by index in VARIANTS). Not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Variant:
    name: str
    worker_options: bool = True  # session_options() of runtime/session.py, else a default one
    process: str = "worker"  # worker: `_limit_memory` (limits + malloc tuning); plain: none;
    # rlimit: the limits only; arenas: mallopt(M_ARENA_MAX, 2) only; mmap: the worker's,
    # plus glibc's mmap threshold fixed at 32 MiB (large blocks come from the heap)
    threads: int = 0
    spin_us: int | None = 50  # the worker's default (--intra-op-spin-us)
    arena: bool | None = None  # None: as the options say
    shrink: bool = False  # run option memory.enable_memory_arena_shrinkage = cpu:0
    opt_level: str | None = None  # graph_optimization_level, by name


VARIANTS = [
    Variant("default session", worker_options=False, process="plain", spin_us=None),
    Variant("default session, worker process", worker_options=False, spin_us=None),
    Variant("worker (as served)"),
    Variant("worker, plain process", process="plain"),
    Variant("worker, rlimits only", process="rlimit"),
    Variant("worker, M_ARENA_MAX=2 only", process="arenas"),
    Variant("worker + M_MMAP_THRESHOLD 32 MiB", process="mmap"),
    Variant("worker + arena", arena=True),
    Variant("worker + arena + shrink", arena=True, shrink=True),
    Variant("worker t1", threads=1),
    Variant("worker t2", threads=2),
    Variant("worker spin off", spin_us=0),
    Variant("worker spin default", spin_us=None),
    Variant("worker t1 + arena + shrink", threads=1, arena=True, shrink=True),
    Variant("worker opt ALL", opt_level="ORT_ENABLE_ALL"),
    Variant("worker + arena + shrink, spin off", arena=True, shrink=True, spin_us=0),
    Variant("worker opt EXTENDED", opt_level="ORT_ENABLE_EXTENDED"),
]

MEMORY_LIMIT = 2 << 30  # `serve`'s default --worker-memory


def child(spec: str) -> None:
    """One variant's process: builds its session, then answers `N` with N run times
    (and the CPU time and page faults of those runs: both robust to the machine's load)."""
    import resource

    variant = Variant(**json.loads(spec))
    if variant.process in ("worker", "mmap"):
        from blindinfer.runtime.workers import _limit_memory

        _limit_memory(MEMORY_LIMIT)
    elif variant.process == "rlimit":
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT, MEMORY_LIMIT))
    if variant.process in ("arenas", "mmap"):
        import ctypes

        libc = ctypes.CDLL(None)
        if variant.process == "arenas":
            libc.mallopt(-8, 2)
        else:
            libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    import onnxruntime as ort

    from blindinfer.runtime.session import session_options
    from support import minilm

    if variant.worker_options:
        options = session_options(intra_op_threads=variant.threads, spin_us=variant.spin_us)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = variant.threads
    if variant.arena is not None:
        options.enable_cpu_mem_arena = variant.arena
    if variant.opt_level is not None:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, variant.opt_level)
    run_options = None
    if variant.shrink:
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session = ort.InferenceSession(
        minilm.minilm_onnx_path().read_bytes(), options, providers=["CPUExecutionProvider"]
    )
    feed = minilm.minilm_inputs(["The quick brown fox jumps over the lazy dog."], seq_len=128)
    for _ in range(3):
        session.run(None, feed, run_options)
    print("ready", flush=True)
    for line in sys.stdin:
        samples = []
        usage = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(int(line)):
            start = time.perf_counter()
            session.run(None, feed, run_options)
            samples.append((time.perf_counter() - start) * 1000)
        after = resource.getrusage(resource.RUSAGE_SELF)
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
        faults = after.ru_minflt - usage.ru_minflt
        print(json.dumps({"ms": samples, "rss": rss, "cpu": cpu, "faults": faults}), flush=True)


def memory_child(arena: str) -> None:
    """What one session holds after its runs, in a worker-like process: RSS growth over
    the load (what the registry budgets) for a model with 4 MiB of weights and 64 MiB of
    intermediates per run; `arena`: off (the workers), on, or shrink (on, and shrunk
    after every run)."""
    import numpy as np
    import onnxruntime as ort

    from blindinfer.runtime.session import session_options
    from blindinfer.runtime.workers import _limit_memory, _rss_bytes, _trim
    from support.onnx_models import mlp_model, model_bytes

    _limit_memory(MEMORY_LIMIT)
    wide = model_bytes(mlp_model(in_features=256, hidden=4096, out_features=8))
    options = session_options(intra_op_threads=1)
    options.enable_cpu_mem_arena = arena != "off"
    run_options = None
    if arena == "shrink":
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    _trim()
    before = _rss_bytes()
    session = ort.InferenceSession(wide, options, providers=["CPUExecutionProvider"])
    _trim()
    cost = _rss_bytes() - before
    x = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)
    growth = []
    for _ in range(5):
        session.run(None, {"x": x}, run_options)
        growth.append((_rss_bytes() - before) >> 20)
    print(f"  arena {arena:6}: measured at load {cost >> 20} MiB; after each run {growth} MiB")


def main() -> None:
    from timing import machine

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated indexes of VARIANTS")
    parser.add_argument("--iterations", type=int, default=0)
    parser.add_argument("--memory", action="store_true", help="the arena's memory only")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    if args.memory:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        print("# RSS growth over the load, 4 MiB of weights, 64 MiB of intermediates per run")
        for arena in ("off", "on", "shrink"):
            subprocess.run([sys.executable, __file__, "--memory-child", arena], env=env, check=True)
        return
    chosen = [VARIANTS[int(i)] for i in args.only.split(",")] if args.only else VARIANTS
    iterations, block = (30, 5) if args.quick else (100, 10)
    iterations = args.iterations or iterations
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = {}
    for variant in chosen:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(asdict(variant))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        procs[variant.name] = proc
    samples: dict[str, list[float]] = {name: [] for name in procs}
    rss: dict[str, int] = {}
    cpu: dict[str, float] = {name: 0.0 for name in procs}
    faults: dict[str, int] = {name: 0 for name in procs}
    order = list(procs)
    while min(len(s) for s in samples.values()) < iterations:
        order = order[1:] + order[:1]  # each round starts with another variant
        for name in order:
            proc = procs[name]
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{block}\n")
            proc.stdin.flush()
            reply = json.loads(proc.stdout.readline())
            samples[name] += reply["ms"]
            rss[name] = reply["rss"]
            cpu[name] += reply["cpu"]
            faults[name] += reply["faults"]
    for proc in procs.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    print(f"# {machine()}; load average {os.getloadavg()[0]:.2f} at the end")
    print(f"# MiniLM-L6 b1x128, {iterations} runs per variant in blocks of {block}")
    base = statistics.median(samples[next(iter(samples))])
    print(
        f"{'variant':36} {'median ms':>9} {'p10':>6} {'p90':>6} {'mean':>6} {'ratio':>6} "
        f"{'RSS MiB':>8} {'CPU ms/run':>10} {'faults/run':>10}"
    )
    for name, values in samples.items():
        ordered = sorted(values)
        p10, p90 = ordered[len(ordered) // 10], ordered[len(ordered) * 9 // 10]
        median = statistics.median(values)
        print(
            f"{name:36} {median:9.2f} {p10:6.2f} {p90:6.2f} {statistics.mean(values):6.2f} "
            f"{median / base:6.2f} "
            f"{rss[name] / (1 << 20):8.0f} {cpu[name] * 1000 / len(values):10.2f} "
            f"{faults[name] / len(values):10.0f}"
        )


if __name__ == "__main__":
    main()
