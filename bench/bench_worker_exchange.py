"""The server <-> worker exchange alone, before and after: `WorkerPool.run_async` of the
MLP 64-256-10 (batch 1), on a uvloop event loop as in the server, no HTTP and no TLS.

Two child processes, one per code tree (`--base-src DIR`: the `src` of a clean `git
worktree` of the commit to compare against; the other this tree), each with its own pool
of one worker and the model loaded. The parent asks them for blocks of runs in turn (A, B,
A, ...), so that the machine's load hits both alike, and prints each tree's median time per
run, the CPU time per run of the server process and of its worker (what a loaded machine
pays), and the ratio. What it times: the command's framing, the pipe both ways, the worker's
loop around onnxruntime, the reply's checks and the loop's wake-up.

Run: `.venv/bin/python bench/bench_worker_exchange.py --base-src /tmp/base/src`.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child() -> None:
    """Serves `n` lines from stdin: runs n requests, answers the per-run seconds."""

    import numpy as np
    import uvloop

    sys.path.insert(0, str(ROOT / "tests"))
    from blindinfer.runtime.workers import WorkerPool
    from support import onnx_models

    model = onnx_models.model_bytes(onnx_models.mlp_model())
    pool = WorkerPool(workers=1, memory_limit_bytes=1 << 30, timeout_s=30, source=lambda key: model)
    pool.load("mlp", model)
    x = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}
    loop = uvloop.new_event_loop()

    async def block(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await pool.run_async("mlp", x)
            times.append(time.perf_counter() - start)
        return times

    worker_pid = pool._workers[0].process.pid  # type: ignore[union-attr]

    def worker_cpu() -> float:
        # utime and stime, in clock ticks (fields 14 and 15 of /proc/PID/stat)
        fields = Path(f"/proc/{worker_pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    loop.run_until_complete(block(200))  # warm up
    print("ready", flush=True)
    for line in sys.stdin:
        cpu, theirs = time.process_time(), worker_cpu()
        times = loop.run_until_complete(block(int(line)))
        cpu, theirs = time.process_time() - cpu, worker_cpu() - theirs
        print(f"{cpu:.6f} {theirs:.6f} " + " ".join(f"{t:.9f}" for t in times), flush=True)
    pool.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-src", required=True)
    parser.add_argument("--tree-src", default=str(ROOT / "src"))
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--per-block", type=int, default=300)
    args = parser.parse_args()
    names = {"before": args.base_src, "after": args.tree_src}
    children = {}
    for name, src in names.items():
        env = dict(os.environ, PYTHONPATH=src)
        children[name] = subprocess.Popen(
            [sys.executable, __file__, "--child"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    for proc in children.values():
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu = {name: [0.0, 0.0] for name in names}  # server process, worker process
    for index in range(args.blocks):
        order = list(names) if index % 2 == 0 else list(reversed(names))
        for name in order:
            proc = children[name]
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{args.per_block}\n")
            proc.stdin.flush()
            server_cpu, worker_cpu, *block = proc.stdout.readline().split()
            cpu[name][0] += float(server_cpu)
            cpu[name][1] += float(worker_cpu)
            times[name] += [float(t) for t in block]
    for proc in children.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.blocks} blocks x {args.per_block} runs")
    medians = {}
    for name, values in times.items():
        values.sort()
        medians[name] = statistics.median(values)
        p90 = values[int(0.9 * len(values))]
        server_us, worker_us = (1e6 * c / len(values) for c in cpu[name])
        print(
            f"{name:>7}: median {medians[name] * 1e3:.3f} ms, p90 {p90 * 1e3:.3f} ms; "
            f"CPU per run: server {server_us:.0f} us, worker {worker_us:.0f} us"
        )
    print(f"after / before: {medians['after'] / medians['before']:.2f}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child()
    else:
        main()
