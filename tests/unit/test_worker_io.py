"""WorkerPool.run_async: the exchange with an idle worker done on the event loop.

What is checked: the loop's path gives the thread path's outputs and never starts the
worker's queue thread; it leaves the worker's socket blocking for the thread path (uvloop
makes a watched descriptor non-blocking: a large load afterwards failed with EAGAIN); a
model that runs too long is killed by the deadline, as on the thread path, without ever
blocking the loop; a caller that goes away mid-run leaves the pipe in step; an idle worker
that died is replaced before the run. A worker's reply is checked by the same code as on
the thread path: object dtypes, oversized tensors and frames of the wrong size are refused
before anything is allocated; any bytes at all give those errors (hypothesis), and bytes
after a reply too. The frames written in one gathered write read back exactly.

Timings are never asserted tightly: only generous bounds on a timed-out request.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
import uvloop
from hypothesis import given, settings

from blindinfer.runtime import worker_io
from blindinfer.runtime.errors import InferenceTimeoutError
from blindinfer.runtime.workers import WorkerPool, _tensor_specs
from support import hostile_models as hostile
from support.onnx_models import mlp_model, model_bytes
from support.worker_replies import any_reply_bytes, frame, reply

MLP = model_bytes(mlp_model())
MLP_X = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
SLOW_X = np.eye(256, dtype=np.float32)
TIMEOUT_S = 2.0
MARGIN_S = 5.0
T = TypeVar("T")


def on_uvloop(coroutine: Coroutine[Any, Any, T]) -> T:
    """The server's event loop (uvicorn picks uvloop)."""
    return uvloop.run(coroutine)


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    models = {"mlp": MLP, "slow": hostile.slow_model(), "big": hostile.large_initializer_model()}
    with WorkerPool(
        workers=1,
        memory_limit_bytes=2 << 30,
        timeout_s=TIMEOUT_S,
        source=models.__getitem__,
        intra_op_threads=1,
    ) as made:
        made.load("mlp", MLP)
        yield made


def test_loop_path_matches_thread_path_without_a_queue_thread(pool: WorkerPool) -> None:
    expected = pool.run("mlp", {"x": MLP_X})
    pool._workers[0].executor.shutdown()  # type: ignore[union-attr]
    pool._workers[0].executor = None

    async def runs() -> list[dict[str, np.ndarray]]:
        return [await pool.run_async("mlp", {"x": MLP_X}) for _ in range(5)]

    for outputs in on_uvloop(runs()):
        assert outputs.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(outputs[name], expected[name])
    assert pool._workers[0].executor is None  # every run was done on the loop
    assert pool.stats()[0].pending == 0


def test_socket_stays_blocking_for_the_thread_path(pool: WorkerPool) -> None:
    on_uvloop(pool.run_async("mlp", {"x": MLP_X}))
    conn = pool._workers[0].conn
    assert conn is not None and os.get_blocking(conn.fileno())
    # 64 MiB written by the thread path: with a non-blocking socket this was EAGAIN
    loaded = pool.load("big", hostile.large_initializer_model())
    assert loaded.memory_bytes > 0
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape[0] == 4


def test_endless_run_is_killed_without_blocking_the_loop(pool: WorkerPool) -> None:
    pool.load("slow", hostile.slow_model())
    before = pool.stats()[0].pid

    async def run_and_tick() -> tuple[float, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        beating = asyncio.ensure_future(ticker())
        started = time.monotonic()
        with pytest.raises(InferenceTimeoutError):
            await pool.run_async("slow", {"x": SLOW_X})
        beating.cancel()
        return time.monotonic() - started, ticks

    elapsed, ticks = on_uvloop(run_and_tick())
    assert elapsed < TIMEOUT_S + MARGIN_S
    assert ticks >= 5  # the loop kept running while the worker did not answer
    assert pool.stats()[0].pid != before  # replaced
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape[0] == 4  # reloaded from the source


def test_cancelled_caller_leaves_the_pipe_in_step(pool: WorkerPool) -> None:
    # ~50 ms of work: the reply is still to come when the caller goes (a small model's
    # reply may already be read within the send, and the caller then never waits)
    pool.load("short", hostile.slow_model(iterations=50))

    async def cancel_then_run() -> dict[str, np.ndarray]:
        task = asyncio.ensure_future(pool.run_async("short", {"x": SLOW_X}))
        await asyncio.sleep(0)  # the command is written, the reply not yet read
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await pool.run_async("mlp", {"x": MLP_X})

    outputs = on_uvloop(cancel_then_run())
    np.testing.assert_array_equal(
        outputs["probabilities"], pool.run("mlp", {"x": MLP_X})["probabilities"]
    )
    assert pool.stats()[0].restarts == 0


def test_idle_worker_that_died_is_replaced_first(pool: WorkerPool) -> None:
    pid = pool.stats()[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    process = pool._workers[0].process
    assert process is not None
    process.join(5)
    outputs = on_uvloop(pool.run_async("mlp", {"x": MLP_X}))
    assert outputs["probabilities"].shape[0] == 4  # the innocent request succeeded


# -- the reply, as a hostile worker could write it ---------------------------------------------


async def _readreply(raw: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """`WorkerPool._exchange`'s reading of a reply, fed from a socket the test writes."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(raw)
        theirs.shutdown(socket.SHUT_WR)  # then EOF: the worker is gone
        exchange = worker_io.Exchange(ours.fileno(), time.monotonic() + 5)
        try:
            _, results = await exchange.reply(1 << 20, max_bytes, _tensor_specs)
            return results
        finally:
            exchange.close()


def test_reply_is_read_exactly() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = reply([["y", y.dtype.str, [2, 3]]], y.tobytes())
    outputs = on_uvloop(_readreply(raw, 1 << 20))
    np.testing.assert_array_equal(outputs["y"], y)


@pytest.mark.parametrize(
    ("tensors", "frames", "refusal"),
    [
        ([["y", "|O", [1]]], [b"\0" * 8], "may not cross the pipe"),
        ([["y", "<f4", [1 << 40]]], [], "larger than a worker's memory limit"),
        ([["y", "<f4", [-1]]], [], "malformed tensor shape"),
        ([["y", "<f4", [4]]], [b"\0" * 8], "wrong size"),
        ("not a list", [], "malformed tensor list"),
    ],
)
def test_hostile_reply_is_refused(tensors: Any, frames: list[bytes], refusal: str) -> None:
    raw = reply(tensors, *frames)
    with pytest.raises(ValueError, match=refusal):
        on_uvloop(_readreply(raw, 1 << 20))


def test_oversized_header_frame_is_refused() -> None:
    raw = struct.pack("!i", (1 << 20) + 1)
    with pytest.raises(ValueError, match="unexpected size"):
        on_uvloop(_readreply(raw, 1 << 20))


def test_closed_worker_socket_is_worker_gone() -> None:
    with pytest.raises(worker_io.WorkerGone):
        on_uvloop(_readreply(b"", 1 << 20))


def test_bytes_after_the_reply_are_refused() -> None:
    # read ahead with the reply: the worker sent something unasked, the pipe is out of step
    y = np.arange(3, dtype=np.int64)
    raw = reply([["y", y.dtype.str, [3]]], y.tobytes()) + b"\0\0\0\1x"
    with pytest.raises(ValueError, match="bytes after the reply"):
        on_uvloop(_readreply(raw, 1 << 20))


@settings(max_examples=300, deadline=None)
@given(raw=any_reply_bytes)
def test_any_worker_bytes_give_the_existing_errors(raw: bytes) -> None:
    # Whatever a hostile worker writes: a result, or ValueError / WorkerGone (replacing
    # it), never another exception, and never an allocation beyond the limits.
    tracemalloc.start()
    try:
        on_uvloop(_readreply(raw, 1 << 16))
    except (ValueError, worker_io.WorkerGone):
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < (1 << 20) + 4 * worker_io._CHUNK  # header limit 1 MiB, tensors 64 KiB


@pytest.mark.parametrize("sizes", [[40], [0, 3, 5], [1 << 20, 7, 1 << 16], [1] * 700])
def test_written_frames_read_back_exactly(sizes: list[int]) -> None:
    # write_frames (one writev for a small message, several when the socket is full or
    # the parts exceed IOV_MAX) gives send_bytes' framing; the reader reads ahead
    # at most _CHUNK bytes and reads large tensors straight into their arrays.
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": rng.integers(0, 255, n, dtype=np.uint8) for i, n in enumerate(sizes)}
    header = {"ok": True, "tensors": [[k, "|u1", [len(v)]] for k, v in tensors.items()]}
    parts = [json.dumps(header).encode(), *(memoryview(v.data) for v in tensors.values())]
    expected = b"".join(frame(bytes(part)) for part in parts)

    ours, theirs = socket.socketpair()
    with ours, theirs:
        writer = threading.Thread(target=worker_io.write_frames, args=(theirs.fileno(), parts))
        writer.start()

        async def read() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            exchange = worker_io.Exchange(ours.fileno(), time.monotonic() + 10)
            try:
                return await exchange.reply(1 << 20, 1 << 24, _tensor_specs)
            finally:
                exchange.close()

        reply, results = on_uvloop(read())
        writer.join()
        assert reply == header
        assert list(results) == list(tensors)
        for name, array in tensors.items():
            np.testing.assert_array_equal(results[name], array)
        assert ours.getblocking()  # left blocking for the thread path
        theirs.shutdown(socket.SHUT_WR)
        assert ours.recv(1) == b""  # nothing written beyond the frames

    ours, theirs = socket.socketpair()
    with ours, theirs:
        writer = threading.Thread(target=worker_io.write_frames, args=(theirs.fileno(), parts))
        writer.start()
        received = bytearray()
        while len(received) < len(expected):
            received += ours.recv(1 << 20)
        writer.join()
        assert bytes(received) == expected


def test_spin_us_is_checked_and_applied() -> None:
    from blindinfer.runtime.session import ModelSession

    with pytest.raises(ValueError, match="must not be negative"):
        ModelSession(MLP, spin_us=-1)
    for spin_us in (0, 50, None):  # never, capped, onnxruntime's default: all run
        outputs = ModelSession(MLP, spin_us=spin_us).run({"x": MLP_X})
        assert outputs["probabilities"].shape[0] == 4
