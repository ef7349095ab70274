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
reply is read with at most `_CHUNK` bytes read ahead (a small reply takes one recv): its
header (at most `max_header` bytes, a JSON object), then each announced tensor into its
own array after `_tensor_specs` checked all of them (dtype allowlist, total size); a byte
left over after the reply is refused like a malformed one. The bytes are copied out of the
socket into memory the worker cannot reach, so nothing it does afterwards can change what
the server checked. `Exchange.reply_now` reads a small reply whole without awaiting (the
pool's fast path, no task), with the same checks, or leaves it all to `reply`.
`WorkerReader` is the worker's side: the same frames, read straight from its socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
Specs = Callable[
    [Mapping[str, Any], int], Sequence[tuple[str, np.dtype[Any], tuple[int, ...], int]]
]
"""workers._tensor_specs: the one check of a peer's tensor list."""

_CHUNK: Final = 32 << 10
"""The most bytes an exchange reads ahead of what it needs."""


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


_IOV_MAX: Final = 512
"""Buffers per `writev` call: within every platform's IOV_MAX (1024 on Linux)."""


def write_frames(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """Writes each part as one `send_bytes` frame, with as few `writev` calls as the
    blocking descriptor `fd` allows (one for a small message): the same bytes as one
    `send_bytes` per part, without a syscall (and a wake-up of the reader) per frame."""
    views: list[memoryview] = []
    for part in parts:
        view = memoryview(part).cast("B")
        views += (memoryview(_length(len(view))), view)
    first = 0
    while first < len(views):
        sent = os.writev(fd, views[first : first + _IOV_MAX])
        while first < len(views) and sent >= len(views[first]):
            sent -= len(views[first])
            first += 1
        if sent:
            views[first] = views[first][sent:]


class WorkerReader:
    """The worker's side of the pipe, read straight from the socket: the frames of
    `Connection.recv_bytes` (and `recv_bytes_into`), without its BytesIO and copies per
    frame (a few microseconds of each small run). Reads exactly one frame at a time and
    buffers nothing, so `Connection.poll` and the other readers of the same pipe stay in
    step. The descriptor stays blocking: only the worker uses it."""

    def __init__(self, fileno: int) -> None:
        # A duplicate, named (no getsockname), closed with the process.
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, os.dup(fileno))
        self._head = bytearray(8)

    def _exactly(self, view: memoryview) -> None:
        first = True
        while view:
            got = self._sock.recv_into(view, len(view), socket.MSG_WAITALL)
            if not got:
                # Connection's words: EOFError at a frame boundary, OSError inside one
                raise EOFError if first else OSError("got end of file during message")
            first = False
            view = view[got:]

    def frame_length(self, limit: int) -> int:
        head = memoryview(self._head)
        self._exactly(head[:4])
        (size,) = struct.unpack_from("!i", head)
        if size == -1:
            self._exactly(head)
            (size,) = struct.unpack_from("!Q", head)
        if size < 0 or size > limit:
            raise OSError("bad message length")
        return int(size)

    def header(self, limit: int) -> dict[str, Any]:
        """One JSON object frame of at most `limit` bytes (ValueError if not an object)."""
        data = bytearray(self.frame_length(limit))
        self._exactly(memoryview(data))
        header = json.loads(data)
        if not isinstance(header, dict):
            raise ValueError("a header frame must be a JSON object")
        return header

    def tensors(
        self, specs: Sequence[tuple[str, np.dtype[Any], tuple[int, ...], int]]
    ) -> dict[str, Array]:
        """The tensor frames `specs` (workers._tensor_specs, already checked) announce, each
        read straight into its own array; ValueError for a frame of another size."""
        arrays: dict[str, Array] = {}
        for name, dtype, shape, nbytes in specs:
            array = np.empty(shape, dtype=dtype)
            if self.frame_length(nbytes) != nbytes:
                raise ValueError("tensor frame of the wrong size")
            self._exactly(memoryview(array.reshape(-1).view(np.uint8).data))
            arrays[name] = array
        return arrays


class Exchange:
    """The socket of one worker connection, used without blocking until `deadline`
    (time.monotonic()); TimeoutError when it passes."""

    def __init__(self, fileno: int, deadline: float) -> None:
        self._loop = asyncio.get_running_loop()
        # A duplicate, so that closing it leaves the pool's Connection alone. Every call
        # passes MSG_DONTWAIT: the file's blocking mode (shared with the Connection) is
        # not what keeps the loop from blocking. The family and type are those of the
        # pool's socketpair, named so that the socket module asks the kernel for neither.
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, os.dup(fileno))
        self._fd = self._sock.fileno()
        self._deadline = deadline
        self._watched = False
        # Bytes read ahead of what was asked: a small reply (header and tensors) comes in
        # ONE recv instead of two per frame. Bounded (_CHUNK), whatever the worker sends;
        # a tensor at least as large as the buffer is read straight into its array.
        self._buffer = bytearray(_CHUNK)
        self._start = self._end = 0

    def close(self) -> None:
        # uvloop (libuv's uv_poll_init) makes a watched descriptor non-blocking, and the
        # mode belongs to the file both descriptors share: the pool's thread path needs
        # it blocking again (when the loop never watched it, it never changed). A second
        # call does nothing (the pool's fast path may close before handing over).
        if self._sock.fileno() == -1:
            return
        if self._watched:
            os.set_blocking(self._fd, True)
        self._sock.close()

    def send_now(self, data: bytes) -> memoryview:
        """Sends what the socket takes now, without waiting; what is left (empty when all
        went). An OSError other than a full socket is the caller's, as in `send`."""
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view, socket.MSG_DONTWAIT) :]
            except BlockingIOError:
                break
        return view

    def when_readable(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Calls `callback(True)` once the socket is readable, or `callback(False)` once
        the deadline passed, from the loop; whichever comes first removes both. Returns
        the function that removes them (for a caller that stops waiting itself)."""
        loop = self._loop
        fd = self._fd
        self._watched = True
        handles: list[asyncio.TimerHandle] = []

        def stop() -> None:
            loop.remove_reader(fd)
            handles[0].cancel()

        def fire(readable: bool) -> None:
            stop()
            callback(readable)

        loop.add_reader(fd, fire, True)
        handles.append(loop.call_later(max(0.0, self._deadline - time.monotonic()), fire, False))
        return stop

    def reply_now(
        self, max_header: int, max_bytes: int, specs: Specs
    ) -> tuple[dict[str, Any], dict[str, Array]] | None:
        """The whole reply, when what the socket holds now, added to what earlier calls
        read ahead, is all of it and fits the read-ahead buffer (a small reply: every
        tensor under `_CHUNK` bytes), with every check of `reply`; else None, with nothing
        consumed: `reply` then reads (and refuses) the same bytes, so that a partial,
        malformed or failing reply has one code path. One non-blocking recv per call."""
        if self._start:
            return None  # `reply` consumed some: only it knows where the reply stands
        free = memoryview(self._buffer)[self._end :]
        if not free:
            return None
        try:
            got = self._sock.recv_into(free, len(free), socket.MSG_DONTWAIT)
        except OSError:
            return None  # nothing yet, or `reply` meets the same condition
        if not got:
            return None  # the worker is gone: `reply` says so
        self._end += got
        try:
            return self._parse_buffered(max_header, max_bytes, specs)
        except Exception:
            return None  # malformed: `reply` refuses it, with its own error

    def _parse_buffered(
        self, max_header: int, max_bytes: int, specs: Specs
    ) -> tuple[dict[str, Any], dict[str, Array]] | None:
        data = memoryview(self._buffer)[: self._end]
        pos = 0

        def frame(limit: int) -> memoryview | None:
            nonlocal pos
            if pos + 4 > len(data):
                return None
            (size,) = struct.unpack_from("!i", data, pos)
            if size < 0 or size > limit or pos + 4 + size > len(data):
                return None  # incomplete, or refused by `reply` (-1: a long frame)
            pos += 4 + size
            return data[pos - size : pos]

        raw = frame(max_header)
        if raw is None:
            return None
        header = json.loads(bytes(raw))
        if not isinstance(header, dict):
            raise ValueError("a header frame must be a JSON object")
        results: dict[str, Array] = {}
        for name, dtype, shape, nbytes in specs(header, max_bytes):
            body = frame(max_bytes)
            if body is None or len(body) != nbytes:
                return None
            array = np.empty(shape, dtype=dtype)  # the server's own copy
            if nbytes:  # (a view with a zero in its shape cannot be cast)
                memoryview(array.data).cast("B")[:] = body
            results[name] = array
        if pos != len(data):
            return None  # bytes after the reply: `reply` refuses them
        self._start = self._end = 0
        return header, results

    async def send(self, data: bytes | memoryview) -> None:
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

    async def reply(
        self, max_header: int, max_bytes: int, specs: Specs
    ) -> tuple[dict[str, Any], dict[str, Array]]:
        """A reply as the worker writes it: its header (a JSON object of at most
        `max_header` bytes), then each tensor the header announces, read straight into its
        own array once `specs` (workers._tensor_specs) checked them all within `max_bytes`.
        ValueError for any malformed byte, and for bytes after the reply: the worker sends
        nothing unasked while it is idle, so those would put the pipe out of step."""
        header = await self.header(max_header)
        results: dict[str, Array] = {}
        for name, dtype, shape, _ in specs(header, max_bytes):
            array = np.empty(shape, dtype=dtype)
            view = memoryview(array.reshape(-1).view(np.uint8).data)
            if await self.frame_length(max_bytes) != len(view):
                raise ValueError("tensor frame of the wrong size")
            await self.read_into(view)
            results[name] = array
        if self._end > self._start:
            raise ValueError("bytes after the reply")
        return header, results

    async def read_into(self, view: memoryview) -> None:
        """Fills `view` exactly: from the bytes read ahead first, then from the socket,
        reading ahead at most `_CHUNK` bytes."""
        if self._end > self._start:
            n = min(self._end - self._start, len(view))
            view[:n] = self._buffer[self._start : self._start + n]
            self._start += n
            view = view[n:]
        while view:
            if len(view) >= _CHUNK:
                view = view[await self._recv_into(view) :]
                continue
            self._start, self._end = 0, await self._recv_into(memoryview(self._buffer))
            n = min(self._end, len(view))
            view[:n] = self._buffer[:n]
            self._start = n
            view = view[n:]

    async def _recv_into(self, view: memoryview) -> int:
        """At least one byte into `view` (how many), waiting for the socket until the
        deadline."""
        while True:
            try:
                got = self._sock.recv_into(view, len(view), socket.MSG_DONTWAIT)
            except BlockingIOError:
                await self._ready(self._loop.add_reader, self._loop.remove_reader)
                continue
            except ConnectionError as exc:
                raise WorkerGone from exc
            if got == 0:
                raise WorkerGone
            return got

    async def _ready(
        self,
        add: Callable[..., object],
        remove: Callable[[int], object],
    ) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        ready = self._loop.create_future()
        self._watched = True
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
