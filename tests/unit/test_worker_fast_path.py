"""The exchange's fast path (docs/performance.md, "Session 2026-12-07: fixed cost").

`Exchange.reply_now` (the loop's reply read in the readiness callback, no task) must give
exactly what `Exchange.reply` gives, or nothing, leaving the same bytes to `reply`, for
any bytes a worker writes (hypothesis): one code path for every partial, malformed or
failing reply. `WorkerReader` (the worker's side) reads `send_bytes` frames exactly, with
Connection's errors, and never reads past the frame it was asked for. Through a real
pool: small runs, failures and cancelled callers after a fast run give the outputs and
errors of the thread path.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest
import uvloop
from hypothesis import given, settings

from blindinfer.runtime import worker_io
from blindinfer.runtime.errors import InvalidTensorError
from blindinfer.runtime.workers import WorkerPool, _tensor_specs
from support import hostile_models as hostile
from support.onnx_models import mlp_model, model_bytes
from support.worker_replies import any_reply_bytes, frame, reply

MLP = model_bytes(mlp_model())
MLP_X = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)


def _outcome(raw: bytes, fast: bool) -> tuple[str, Any]:
    """The reply `raw` as the loop reads it: `reply_now` first (fast) or `reply` alone."""

    async def read() -> tuple[str, Any]:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            theirs.sendall(raw)
            theirs.shutdown(socket.SHUT_WR)
            exchange = worker_io.Exchange(ours.fileno(), time.monotonic() + 5)
            try:
                if fast:
                    got = exchange.reply_now(1 << 20, 1 << 16, _tensor_specs)
                    if got is not None:
                        return "fast", got
                return "reply", await exchange.reply(1 << 20, 1 << 16, _tensor_specs)
            except (ValueError, worker_io.WorkerGone) as exc:
                return "error", (type(exc), str(exc))
            finally:
                exchange.close()

    return uvloop.run(read())


def _same(a: tuple[str, Any], b: tuple[str, Any]) -> None:
    if a[0] == "error" or b[0] == "error":
        assert a == b
        return
    (header_a, results_a), (header_b, results_b) = a[1], b[1]
    assert header_a == header_b
    assert list(results_a) == list(results_b)
    for name, array in results_a.items():
        assert array.dtype == results_b[name].dtype
        assert array.shape == results_b[name].shape
        assert array.tobytes() == results_b[name].tobytes()


def test_small_reply_is_read_by_the_fast_path_exactly() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    empty = np.zeros((0, 4), dtype=np.float16)
    raw = reply([["y", "<f4", [2, 3]], ["e", "<f2", [0, 4]]], y.tobytes(), b"")
    kind, (header, results) = _outcome(raw, fast=True)
    assert kind == "fast"
    assert header["ok"] is True
    np.testing.assert_array_equal(results["y"], y)
    assert results["e"].shape == empty.shape and results["e"].dtype == empty.dtype
    results["y"][0, 0] = 7  # the server's own, writable copy
    _same(_outcome(raw, fast=True), _outcome(raw, fast=False))


@pytest.mark.parametrize(
    "raw",
    [
        reply([["y", "|O", [1]]], b"\0" * 8),  # refused dtype
        reply([["y", "<f4", [4]]], b"\0" * 8),  # frame of the wrong size
        reply([["y", "<i8", [1]]], b"\0" * 8) + b"\0\0\0\1x",  # bytes after the reply
        reply([["y", "|u1", [40000]]], b"\1" * 40000),  # larger than the read-ahead
        reply([], ok=False),  # a failure: handled by the task, as before
        struct.pack("!i", 1 << 21),  # an oversized header frame
        b"",  # the worker is gone
    ],
)
def test_anything_but_a_whole_small_reply_is_left_toreply(raw: bytes) -> None:
    fast = _outcome(raw, fast=True)
    if raw.startswith(frame(json.dumps({"ok": False, "tensors": []}).encode())):
        assert fast[0] == "fast"  # read whole; the pool hands a failure to the task
    else:
        assert fast[0] != "fast"
    _same(fast, _outcome(raw, fast=False))


@settings(max_examples=300, deadline=None)
@given(raw=any_reply_bytes)
def test_fast_path_gives_what_reply_gives_for_any_bytes(raw: bytes) -> None:
    _same(_outcome(raw, fast=True), _outcome(raw, fast=False))


@pytest.fixture
def pipe() -> Iterator[tuple[Connection, Connection]]:
    ours, theirs = socket.socketpair()
    a, b = Connection(ours.detach()), Connection(theirs.detach())
    with a, b:
        yield a, b


@pytest.mark.parametrize("sizes", [[0], [5, 0, 300], [70000]])
def test_worker_reader_reads_send_bytes_frames_exactly(
    pipe: tuple[Connection, Connection], sizes: list[int]
) -> None:
    server, worker = pipe
    header = {"op": "run", "tensors": [[f"t{i}", "|u1", [n]] for i, n in enumerate(sizes)]}
    blobs = [bytes(range(256)) * (n // 256) + bytes(n % 256) for n in sizes]

    def send() -> None:
        server.send_bytes(json.dumps(header).encode())
        for blob in blobs:
            server.send_bytes(blob)
        server.send_bytes(b"next")

    writer = threading.Thread(target=send)
    writer.start()
    reader = worker_io.WorkerReader(worker.fileno())
    got = reader.header(1 << 20)
    arrays = reader.tensors(_tensor_specs(got, 1 << 20))
    writer.join()
    assert got == header
    assert [a.tobytes() for a in arrays.values()] == blobs
    assert worker.recv_bytes() == b"next"  # nothing read past the frames asked for


def _fresh() -> tuple[Connection, Connection]:
    ours, theirs = socket.socketpair()
    return Connection(ours.detach()), Connection(theirs.detach())


def test_worker_reader_errors_are_connections() -> None:
    # each refusal leaves the pipe out of step (the worker then exits): a fresh one each
    server, worker = _fresh()
    with server, worker:
        server.send_bytes(b"[1, 2]")
        with pytest.raises(ValueError, match="JSON object"):
            worker_io.WorkerReader(worker.fileno()).header(1 << 20)
    server, worker = _fresh()
    with server, worker:
        server.send_bytes(b"{}" + b" " * 100)
        with pytest.raises(OSError, match="bad message length"):
            worker_io.WorkerReader(worker.fileno()).header(64)
    server, worker = _fresh()
    with server, worker:
        server.send_bytes(b"abc")
        specs = _tensor_specs({"tensors": [["t", "|u1", [4]]]}, 1 << 20)
        with pytest.raises(ValueError, match="wrong size"):
            worker_io.WorkerReader(worker.fileno()).tensors(specs)
    server, worker = _fresh()
    with server, worker:
        reader = worker_io.WorkerReader(worker.fileno())
        server.send_bytes(b"{}")
        assert reader.header(1 << 20) == {}
        server._send(struct.pack("!i", 10) + b"abc")  # type: ignore[attr-defined]
        server.close()
        with pytest.raises(OSError, match="end of file during message"):
            reader.header(1 << 20)
        with pytest.raises(EOFError):
            reader.header(1 << 20)


def test_pool_fast_path_outputs_errors_and_cancelled_callers() -> None:
    with WorkerPool(
        workers=1, memory_limit_bytes=2 << 30, timeout_s=10, source={"mlp": MLP}.__getitem__
    ) as pool:
        pool.load("mlp", MLP)
        pool.load("short", hostile.slow_model(iterations=1000, size=64))
        expected = pool.run("mlp", {"x": MLP_X})

        async def scenario() -> None:
            for _ in range(5):
                got = await pool.run_async("mlp", {"x": MLP_X})
                np.testing.assert_array_equal(got["probabilities"], expected["probabilities"])
            with pytest.raises(InvalidTensorError, match=r"input .x. must have shape"):
                await pool.run_async("mlp", {"x": MLP_X[:, :3]})
            # a caller that stops waiting (~50 ms of work, a 16 KiB reply that the fast path
            # reads: the reply is still to come):
            # the reply is still read, the gate freed
            waiting = asyncio.ensure_future(
                pool.run_async("short", {"x": np.eye(64, dtype=np.float32)})
            )
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            got = await pool.run_async("mlp", {"x": MLP_X})
            np.testing.assert_array_equal(got["probabilities"], expected["probabilities"])

        uvloop.run(scenario())
        assert pool.stats()[0].restarts == 0


def test_unload_queued_during_a_fast_run_leaves_its_outputs_alone() -> None:
    # the reply comes while an unload waits for the gate: the task path sends it, and the
    # run keeps its outputs (no second close of the exchange, no replacement)
    slow_x = np.eye(64, dtype=np.float32)
    with WorkerPool(
        workers=1, memory_limit_bytes=2 << 30, timeout_s=10, source={"mlp": MLP}.__getitem__
    ) as pool:
        pool.load("mlp", MLP)
        pool.load("short", hostile.slow_model(iterations=1000, size=64))
        expected = pool.run("short", {"x": slow_x})

        async def scenario() -> dict[str, np.ndarray]:
            running = asyncio.ensure_future(pool.run_async("short", {"x": slow_x}))
            await asyncio.sleep(0.005)  # the command is written, the reply still to come
            pool.unload("mlp")
            return await running

        got = uvloop.run(scenario())
        assert list(got) == list(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(got[name], array)
        stats = pool.stats()[0]
        assert stats.restarts == 0
        assert "mlp" not in stats.loaded
