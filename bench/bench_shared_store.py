"""What following other replicas' commits costs each inference request (issue 12).

Every request resolves its model (`ModelRegistry.resolve`); with replicas sharing a store,
resolve first asks the store whether the manifest changed (`SealedStore.poll`: one `stat`
of manifest.sealed, compared with the file last read). This times `resolve` by name in a
store of 20 models (CPU time of the calling thread, user + system: wall time on a shared
machine is mostly waiting for a CPU), the code before the change (a git worktree of HEAD, passed as
--before SRC) against this tree, in separate processes alternating in blocks
(A, B, A, B, ...), and reports the median per call of each and their difference. Also
the refresh itself: another store commits, then one `resolve` takes it in.

Run: `.venv/bin/python bench/bench_shared_store.py --before /tmp/base/src`.
Not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import hashlib, os, sys, tempfile, time
from pathlib import Path
from blindinfer.store.registry import ModelRegistry
from blindinfer.store.sealed import ModelRecord, SealedStore

KEY = bytes(range(32))
directory = Path(tempfile.mkdtemp(prefix="bench-shared-"))
store = SealedStore(directory, KEY, max_bytes=1 << 30)
for i in range(20):
    data = os.urandom(1000)
    store.put(ModelRecord(f"m{i}", f"net{i}", hashlib.sha256(data).hexdigest(), "t",
                          len(data), float(i)), data)
registry = ModelRegistry(sealed=store, pool=None, memory_budget=1 << 30, max_models=100)
resolve = registry.resolve
for _ in range(2000):
    resolve("net7", "t")
calls = int(sys.argv[1])
start = time.thread_time_ns()  # CPU time: the machine is shared, wall time is noise
for _ in range(calls):
    resolve("net7", "t")
per_call = (time.thread_time_ns() - start) / calls
refresh = -1.0
if hasattr(store, "poll"):  # the new tree: one refresh after another store's commit
    other = SealedStore(directory, KEY, max_bytes=1 << 30)
    samples = []
    for i in range(50):
        data = os.urandom(1000)
        other.put(ModelRecord(f"x{i}", f"x{i}", hashlib.sha256(data).hexdigest(), "t",
                              len(data), 100.0 + i), data)
        start = time.perf_counter_ns()
        resolve("net7", "t")
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    refresh = samples[len(samples) // 2]
print(per_call, refresh)
"""


def _run(src: str, calls: int) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(calls)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    ).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="src/ of the code before the change")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    after_src = str(Path(__file__).resolve().parent.parent / "src")
    before: list[float] = []
    after: list[float] = []
    refreshes: list[float] = []
    for _ in range(args.blocks):
        before.append(_run(args.before, args.calls)[0])
        per_call, refresh = _run(after_src, args.calls)
        after.append(per_call)
        refreshes.append(refresh)
    b, a = statistics.median(before), statistics.median(after)
    print(f"resolve by name, 20 models, median of {args.blocks} blocks x {args.calls} calls")
    print(f"  before: {b / 1000:.2f} us/call   (blocks: {[round(x / 1000, 2) for x in before]})")
    print(f"  after:  {a / 1000:.2f} us/call   (blocks: {[round(x / 1000, 2) for x in after]})")
    print(f"  added:  {(a - b) / 1000:.2f} us/call, ratio {a / b:.3f}")
    refresh = statistics.median(refreshes) / 1000
    print(f"  resolve that takes in another store's commit (wall): {refresh:.1f} us")


if __name__ == "__main__":
    main()
