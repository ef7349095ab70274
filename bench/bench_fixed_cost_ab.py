"""The MLP's fixed cost on two servers, with the same client and each process's CPU time.

`bench_fixed_cost.py` gives the base server the client of its time (no coalescing); this
one uses this tree's client for both servers, so only the servers' code differs. Two
servers (`--base-src`, `--tree-src`: `src` folders, e.g. of `git worktree`s), the MLP
64-256-10 batch 1 through attested TLS, blocks of requests alternating between them (A B,
B A, ...). Prints each server's median, and the CPU per request of the server process,
of its workers (from /proc) and of the client thread: CPU time is steadier than wall
time on a shared machine. Linux only (/proc). Not a test: nothing asserts a time.

Run: `.venv/bin/python bench/bench_fixed_cost_ab.py --base-src /tmp/base/src
--tree-src src`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from bench_fixed_cost import connect, mrenclave_of, server_from

from support import onnx_models

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of `pid` (fields 14 and 15 of /proc/PID/stat), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-src", required=True)
    parser.add_argument("--tree-src", required=True)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--per-block", type=int, default=200)
    args = parser.parse_args()
    sources = {"base": args.base_src, "tree": args.tree_src}
    model = onnx_models.model_bytes(onnx_models.mlp_model())
    feed = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}
    with ExitStack() as stack:
        servers = {k: stack.enter_context(server_from(src, [])) for k, src in sources.items()}
        clients = {
            k: stack.enter_context(connect(s.url, mrenclave_of(sources[k])))
            for k, s in servers.items()
        }
        ids = {k: c.upload_model(model, name="m").model_id for k, c in clients.items()}
        for k, c in clients.items():
            for _ in range(300):  # warm up
                c.run_model(ids[k], feed)
        times: dict[str, list[float]] = {k: [] for k in sources}
        cpu = {k: [0.0, 0.0, 0.0] for k in sources}  # server, workers, client thread
        for index in range(args.blocks):
            for k in list(sources) if index % 2 == 0 else list(reversed(sources)):
                pid = servers[k].process.pid
                workers = children(pid)
                before = (cpu_s(pid), sum(map(cpu_s, workers)), time.thread_time())
                for _ in range(args.per_block):
                    start = time.perf_counter()
                    clients[k].run_model(ids[k], feed)
                    times[k].append(time.perf_counter() - start)
                after = (cpu_s(pid), sum(map(cpu_s, workers)), time.thread_time())
                for i in range(3):
                    cpu[k][i] += after[i] - before[i]
    n = args.blocks * args.per_block
    print(f"load average {os.getloadavg()[0]:.2f}; {args.blocks} blocks x {args.per_block}")
    for k in sources:
        server, workers, client = (1e6 * c / n for c in cpu[k])
        print(
            f"{k}: median {statistics.median(times[k]) * 1e3:.3f} ms; CPU per request: "
            f"server {server:.0f} us, workers {workers:.0f} us, client thread {client:.0f} us"
        )
    ratio = statistics.median(times["tree"]) / statistics.median(times["base"])
    print(f"tree / base: {ratio:.3f}")


if __name__ == "__main__":
    main()
