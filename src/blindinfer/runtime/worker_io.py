"""One run's exchange with an idle worker, on the event loop: no thread hop either way.

The worker pool's thread path (a queue thread per worker, a concurrent Future, a wake-up
of the event loop) costs four context switches per request; on a loaded 2-core machine
that was most of the fixed cost of a small request (docs/performance.md, "Inference fixed
cost: what was changed"). When the model's worker is idle, `WorkerPool.run_async` takes
its gate on the loop and does the exchange here instead: the command is written and the
reply read on the worker's socket with MSG_DONTWAIT and the loop's readiness callbacks,
so the loop never blocks on the worker, even on one that stops reading or writing (the
deadline then kills it, as on the thread path).

The frames are those of `multiprocessing.Connection.send_bytes` (a 4-byte big-endian
length, or -1 and an 8-byte length), so the worker cannot tell the two paths apart. The
reply is read exactly: its header (at most `max_header` bytes, a JSON object), then each
announced tensor straight into its own array after `_tensor_specs` checked all of them
(dtype allowlist, total size). The bytes are copied out of the socket into memory the
worker cannot reach, so nothing it does afterwards can change what the server checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]


class WorkerGone(Exception):
    """The worker closed its end or broke the connection (it died, or was killed)."""


def frames(header: Mapping[str, Any], tensors: Mapping[str, Array]) -> bytes:
    """The command as the worker reads it: one JSON header frame (with the tensors'
    names, dtypes and shapes) and one raw frame per tensor, as bytes to write at once."""
    contiguous = {
        name: array if array.flags.c_contiguous else array.copy(order="C")
        for name, array in tensors.items()
    }
    described = [[name, a.dtype.str, list(a.shape)] for name, a in contiguous.items()]
    parts = [json.dumps({**header, "tensors": described}).encode()]
    parts += [array.reshape(-1).view(np.uint8).tobytes() for array in contiguous.values()]
    return b"".join(_length(len(part)) + part for part in parts)


def _length(n: int) -> bytes:
    return struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)


class Exchange:
    """The socket of one worker connection, used without blocking until `deadline`
    (time.monotonic()); TimeoutError when it passes."""

    def __init__(self, fileno: int, deadline: float) -> None:
        self._loop = asyncio.get_running_loop()
        # A duplicate, so that closing it leaves the pool's Connection alone. Every call
        # passes MSG_DONTWAIT: the file's blocking mode (shared with the Connection) is
        # not what keeps the loop from blocking.
        self._sock = socket.socket(fileno=os.dup(fileno))
        self._fd = self._sock.fileno()
        self._deadline = deadline

    def close(self) -> None:
        # uvloop (libuv's uv_poll_init) makes a watched descriptor non-blocking, and the
        # mode belongs to the file both descriptors share: the pool's thread path needs
        # it blocking again.
        os.set_blocking(self._fd, True)
        self._sock.close()

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                await self._ready(self._loop.add_writer, self._loop.remove_writer)
                continue
            view = view[sent:]

    async def frame_length(self, limit: int) -> int:
        head = bytearray(4)
        await self.read_into(memoryview(head))
        (size,) = struct.unpack("!i", head)
        if size == -1:
            longer = bytearray(8)
            await self.read_into(memoryview(longer))
            (size,) = struct.unpack("!Q", longer)
        if size < 0 or size > limit:
            raise ValueError("frame of an unexpected size")
        return int(size)

    async def header(self, limit: int) -> dict[str, Any]:
        data = bytearray(await self.frame_length(limit))
        await self.read_into(memoryview(data))
        header = json.loads(data)
        if not isinstance(header, dict):
            raise ValueError("a header frame must be a JSON object")
        return header

    async def read_into(self, view: memoryview) -> None:
        """Fills `view` exactly; never reads past it (the next frame stays in the socket)."""
        while view:
            try:
                got = self._sock.recv_into(view, len(view), socket.MSG_DONTWAIT)
            except BlockingIOError:
                await self._ready(self._loop.add_reader, self._loop.remove_reader)
                continue
            except ConnectionError as exc:
                raise WorkerGone from exc
            if got == 0:
                raise WorkerGone
            view = view[got:]

    async def _ready(
        self,
        add: Callable[..., object],
        remove: Callable[[int], object],
    ) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        ready = self._loop.create_future()
        add(self._fd, _settle, ready, None)
        timer = self._loop.call_later(remaining, _settle, ready, TimeoutError())
        try:
            await ready
        finally:
            remove(self._fd)
            timer.cancel()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
