"""Would shared memory make the worker hop of a large output cheaper than the pipe?

A child process plays the worker: on each command (a small frame, as the server's
`run`) it replies with MiniLM's outputs (b1 x 128: 198 KB of float32) either
  - pipe: as the worker does now (`_send`: a JSON header frame, one raw frame per tensor),
    read by the server's event-loop path (`worker_io.Exchange`, `_tensor_specs`), or
  - shm:  written into a shared memory region (one memcpy), announced by offsets in the
    header frame; the parent copies them out ONCE into its own arrays.
Round trips are timed in the parent, interleaved in blocks (A, B, A, ...). The difference
is what shared memory could save per request; no model runs here.

Run: `.venv/bin/python bench/bench_worker_hop.py`. Not a test: nothing asserts a time.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"token_embeddings": (1, 128, 384), "sentence_embedding": (1, 384)}
REGION = 4 << 20


def worker(conn: Connection, path: str) -> None:
    from blindinfer.runtime.workers import _recv_header, _send

    with open(path, "r+b") as file:
        region = mmap.mmap(file.fileno(), REGION)
    outputs = {n: np.random.default_rng(0).random(s, dtype=np.float32) for n, s in SHAPES.items()}
    while True:
        try:
            header = _recv_header(conn)
        except EOFError:
            return
        if header["via"] == "pipe":
            _send(conn, {"ok": True}, outputs)
            continue
        described = []
        offset = 0
        for name, array in outputs.items():
            view = np.frombuffer(region, dtype=array.dtype, count=array.size, offset=offset)
            view[...] = array.reshape(-1)
            described.append([name, array.dtype.str, list(array.shape), offset])
            offset += array.nbytes
        conn.send_bytes(json.dumps({"ok": True, "shm": described, "tensors": []}).encode())


async def pipe_round(conn: Connection) -> None:
    from blindinfer.runtime import worker_io
    from blindinfer.runtime.workers import _tensor_specs

    exchange = worker_io.Exchange(conn.fileno(), time.monotonic() + 5)
    try:
        await exchange.send(worker_io.frames({"via": "pipe"}, {}))
        reply = await exchange.header(1 << 20)
        for _name, dtype, shape, _ in _tensor_specs(reply, 1 << 30):
            array = np.empty(shape, dtype=dtype)
            view = memoryview(array.reshape(-1).view(np.uint8).data)
            if await exchange.frame_length(1 << 30) != len(view):
                raise ValueError
            await exchange.read_into(view)
    finally:
        exchange.close()


async def shm_round(conn: Connection, region: mmap.mmap) -> None:
    from blindinfer.runtime import worker_io

    exchange = worker_io.Exchange(conn.fileno(), time.monotonic() + 5)
    try:
        await exchange.send(worker_io.frames({"via": "shm"}, {}))
        reply = await exchange.header(1 << 20)
        for _name, dtype, shape, offset in reply["shm"]:
            array = np.empty(shape, dtype=dtype)
            array.reshape(-1).view(np.uint8)[...] = np.frombuffer(
                region, dtype=np.uint8, count=array.nbytes, offset=offset
            )
    finally:
        exchange.close()


async def measure(conn: Connection, region: mmap.mmap, rounds: int, block: int) -> None:
    from timing import machine

    samples: dict[str, list[float]] = {"pipe": [], "shm": []}
    for _ in range(20):
        await pipe_round(conn)
        await shm_round(conn, region)
    while len(samples["shm"]) < rounds:
        for name in samples:
            for _ in range(block):
                start = time.perf_counter()
                if name == "pipe":
                    await pipe_round(conn)
                else:
                    await shm_round(conn, region)
                samples[name].append((time.perf_counter() - start) * 1000)
    print(f"# {machine()}; load average {os.getloadavg()[0]:.2f}")
    print(f"# round trip with MiniLM's outputs (198 KB), {rounds} each in blocks of {block}")
    for name, values in samples.items():
        ordered = sorted(values)
        print(
            f"  {name:5} median {statistics.median(values):.3f} ms, p10 "
            f"{ordered[len(ordered) // 10]:.3f}, p90 {ordered[len(ordered) * 9 // 10]:.3f}"
        )
    saved = statistics.median(samples["pipe"]) - statistics.median(samples["shm"])
    print(f"  saved by shared memory: {saved:.3f} ms per request (medians)")


def main() -> None:
    import uvloop

    path = f"/dev/shm/blindinfer-bench-hop-{os.getpid()}"
    with open(path, "w+b") as file:
        file.truncate(REGION)
        region = mmap.mmap(file.fileno(), REGION)
    try:
        parent, child = multiprocessing.get_context("spawn").Pipe()
        process = multiprocessing.get_context("spawn").Process(
            target=worker, args=(child, path), daemon=True
        )
        process.start()
        uvloop.run(measure(parent, region, 1000, 50))
        parent.close()
        process.join(5)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
