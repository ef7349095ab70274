"""Where a reload from sealed storage goes: the evict + reload path of a 64 MiB model, step by step.

Two parts, in one run (printed only; nothing here asserts a time):
  (a) through the registry, in-process: `ModelRegistry.run` on the model that is not loaded
      (budget for one 64 MiB Gather model of bench_resilience, --workers 1), with the
      server-side steps timed by wrapping them: `SealedStore.get` (read, decrypt,
      authenticate, SHA-256 check), `WorkerPool.load` (send to the worker, its load, the
      reply), the audit entries (evict, restore: each written and fsynced), the run.
  (b) the worker's side of a load, step by step, in a child process that does what
      `runtime/workers.py` `_load` does with the same functions: receive the payload, drop
      the evicted session, refuse external data (a full ONNX parse), the RSS measurement
      with its `malloc_trim`s, the onnxruntime session, then a first run.
Run: `.venv/bin/python bench/profile_reload.py [--repeats N]`; PYTHONPATH=<other tree>/src
profiles another version of blindinfer (docs/performance.md, "Reloading a model from
sealed storage").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_resilience import gather_model  # noqa: E402
from timing import machine  # noqa: E402

MiB = 1 << 20
FEED = {"x": np.array([0, 1, 2, 3], np.int64)}


def _timed(times: dict[str, list[float]], label: str, call: Callable[..., Any]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            times.setdefault(label, []).append((time.perf_counter() - start) * 1000)

    return wrapper


def registry_part(models: list[bytes], repeats: int) -> dict[str, list[float]]:
    from blindinfer.runtime.workers import WorkerPool
    from blindinfer.server.audit import AuditLog
    from blindinfer.store.registry import ModelRegistry
    from blindinfer.store.sealed import SealedStore

    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="profile-reload-") as tmp:
        sealed = SealedStore(Path(tmp) / "store", secrets.token_bytes(32), max_bytes=1 << 34)
        audit = AuditLog(Path(tmp) / "audit.log")
        audit.record = _timed(times, "audit entry (x2: evict, restore)", audit.record)  # type: ignore[method-assign]
        box: list[ModelRegistry] = []
        pool = WorkerPool(
            workers=1,
            memory_limit_bytes=2 << 30,
            timeout_s=30,
            source=lambda sha256: box[0].source(sha256),
        )
        registry = ModelRegistry(
            sealed=sealed, pool=pool, memory_budget=97 * MiB, max_models=10, audit=audit.record
        )
        box.append(registry)
        try:
            records = [
                registry.add(m, hashlib.sha256(m).hexdigest(), name=f"m{i}", owner="o")[0]
                for i, m in enumerate(models)
            ]
            registry.run(records[1], FEED)
            sealed.get = _timed(times, "SealedStore.get", sealed.get)  # type: ignore[method-assign]
            pool.load = _timed(times, "WorkerPool.load (send + worker)", pool.load)  # type: ignore[method-assign]
            times.clear()
            for index in range(repeats):
                record = records[index % 2]
                start = time.perf_counter()
                registry.run(record, FEED)
                times.setdefault("cold run (total)", []).append(
                    (time.perf_counter() - start) * 1000
                )
                start = time.perf_counter()
                registry.run(record, FEED)
                times.setdefault("warm run", []).append((time.perf_counter() - start) * 1000)
        finally:
            registry.close()
    return times


def _worker_child(conn: Connection) -> None:
    from blindinfer.runtime import workers
    from blindinfer.runtime.external_data import refuse_external_data
    from blindinfer.runtime.session import ModelSession

    ModelSession(workers._identity_model())
    conn.send_bytes(b"ready")
    sessions: dict[int, Any] = {}
    while True:
        try:
            workers._recv_header(conn)
        except EOFError:
            return
        t0 = time.perf_counter()
        data = workers._recv_payload(conn)
        t1 = time.perf_counter()
        sessions.clear()
        workers._trim()
        t2 = time.perf_counter()
        refuse_external_data(data)
        t3 = time.perf_counter()
        workers._trim()
        before = workers._rss_bytes()
        t4 = time.perf_counter()
        session = ModelSession(data, external_data_refused=True)
        t5 = time.perf_counter()
        workers._trim()
        cost = workers._rss_bytes() - before
        t6 = time.perf_counter()
        session.run(FEED)
        t7 = time.perf_counter()
        sessions[0] = session
        del session, data  # only `sessions` holds it, as in the worker
        steps = {
            "receive the payload": t1 - t0,
            "drop the evicted session + trim": t2 - t1,
            "refuse external data (ONNX parse)": t3 - t2,
            "trim + RSS before": t4 - t3,
            "onnxruntime session": t5 - t4,
            "trim + RSS after": t6 - t5,
            "first run": t7 - t6,
        }
        conn.send_bytes(json.dumps({"steps": steps, "cost_mib": cost / MiB}).encode())


def worker_part(models: list[bytes], repeats: int) -> dict[str, list[float]]:
    from blindinfer.runtime import workers

    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_worker_child, args=(theirs,))
    child.start()
    theirs.close()
    ours.recv_bytes()
    times: dict[str, list[float]] = {}
    try:
        for index in range(repeats):
            start = time.perf_counter()
            workers._send_raw(ours, {"op": "load"}, models[index % 2])
            sent = time.perf_counter() - start
            reply = json.loads(ours.recv_bytes())
            for label, seconds in {**reply["steps"], "send (server side)": sent}.items():
                times.setdefault(label, []).append(seconds * 1000)
            times.setdefault("session cost MiB (measured)", []).append(reply["cost_mib"])
    finally:
        ours.close()
        child.join(10)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    print(f"evict + reload of a 64 MiB model, step by step; {machine()}")
    models = [gather_model(64 * MiB, seed) for seed in (1, 2)]
    for title, part in (
        ("(a) through the registry (server side)", registry_part),
        ("(b) the worker's side of a load", worker_part),
    ):
        times = part(models, args.repeats)
        print(f"\n{title}, {args.repeats} reloads; median (min) ms")
        for label, samples in times.items():
            print(f"  {label:<42} {statistics.median(samples):8.1f} ({min(samples):.1f})")


if __name__ == "__main__":
    main()
