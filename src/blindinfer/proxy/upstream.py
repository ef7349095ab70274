"""The proxy's upstream side: pinned TLS connections on its event loop, HTTP/1.1 by h11.

Why not httpx: profiled under keep-alive requests, httpx + httpcore + h11 took about 40%
of the proxy's busy CPU (request and URL objects, the pool's locks and cancel scopes, a
`select` per reuse, anyio-style streams), most of the +1 ms the proxy added per request.
Here one asyncio `Protocol` per connection feeds h11 directly: the request head and a body
that came whole leave in one TLS write, and the response's events are read as the bytes
arrive (a closed idle connection is known from its own `connection_lost`, no polling).

What each piece guarantees:
- `PinnedPool.acquire` opens a new connection with the pinned context (only the attested
  certificate verifies) and passes the certificate the handshake presented, and the
  connection, to `check` (the attestation state's own test, which may attest again; for
  replicas behind a balancer it attests the replica's key on this very connection, with
  `receive_raw`) before the connection is returned, so before any request byte is
  written on it.
- `Exchange` bounds the response: its head (`MAX_HEAD_BYTES`, h11's own limit) and its
  body (`ResponseTooLarge` past `limit`); received bytes wait in a buffer of at most
  `READ_HIGH_WATER` before reading from the socket pauses.
- A reused connection that the server closed before any byte of the response is
  `StaleConnection`: the caller may send the request again on a new connection, once.
- `aclose` aborts every connection, idle or in use: after a failed or changed attestation
  nothing more flows on a connection pinned to the previous one.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import cast

import h11

MAX_HEAD_BYTES = 1 << 16
# h11 enforces its limit only on an event still incomplete; fed at most one byte more than
# the limit at a time, a head that is not complete within MAX_HEAD_BYTES is refused
# whatever the pace at which it arrived.
FEED_BYTES = MAX_HEAD_BYTES + 1
READ_HIGH_WATER = 1 << 18
KEEPALIVE_SECONDS = 20.0  # below the server's 30 s keep-alive


class UpstreamError(Exception):
    """The exchange with the upstream failed after its connection was made."""


class StaleConnection(UpstreamError):
    """A reused connection was closed by the server before any response byte."""


class ResponseTooLarge(UpstreamError):
    """The upstream's response body went past the limit."""


class Connection(asyncio.Protocol):
    """One TLS connection: bytes in a bounded buffer, read into h11 on demand."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.reused = False
        self.closed = False
        self.received = 0  # bytes received since the current request began
        self.body_total = 0  # bytes of the current response's body
        self.idle_since = 0.0
        self._chunks: collections.deque[bytes | memoryview] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._write_paused = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.received += len(data)
        if self._buffered > READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._eof = True
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- used by Exchange and the pool -------------------------------------------------------

    @property
    def ended(self) -> bool:
        """The server closed its side (or the connection is gone)."""
        return self._eof

    @property
    def answered(self) -> bool:
        """Bytes or an end arrived: the server answered (or closed) already."""
        return bool(self._chunks) or self._eof

    def usable(self) -> bool:
        """An idle connection may carry a new request: open, nothing unread."""
        return not self.closed and not self._chunks and not self._eof

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self, future: asyncio.Future[None], timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout, _expire, future, what)
        try:
            await future
        finally:
            timer.cancel()

    async def write(self, data: bytes, timeout: float) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise UpstreamError("the upstream closed the connection")
        self.transport.write(data)
        if self._write_paused:
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._wait(self._writable, timeout, "writing to the upstream timed out")
            finally:
                self._writable = None
            if self.closed:
                raise UpstreamError("the upstream closed the connection")

    async def receive_raw(self, timeout: float) -> bytes:
        """The bytes received so far, waiting for some (b"" once the server closed): for an
        exchange parsed elsewhere (the replica key check's), before h11 sees any."""
        while not self._chunks and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._wait(self._waiter, timeout, "the upstream did not answer in time")
            finally:
                self._waiter = None
        data = b"".join(bytes(chunk) for chunk in self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    async def next_event(self, timeout: float) -> h11.Event | type[h11.PAUSED]:
        """h11's next event, reading more bytes as it needs them."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamError(f"the upstream's answer is not valid HTTP/1.1: {exc}") from exc
            if event is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", event)
            while not self._chunks and not self._eof:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._wait(self._waiter, timeout, "the upstream did not answer in time")
                finally:
                    self._waiter = None
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                if len(data) > FEED_BYTES:  # see FEED_BYTES: the head's bound is exact
                    view = memoryview(data)
                    self._chunks.append(view[FEED_BYTES:])
                    data = view[:FEED_BYTES]
                self._buffered = len(self._chunks[0]) if self._chunks else 0
                if self._reading_paused and self._buffered <= READ_HIGH_WATER and not self.closed:
                    self._reading_paused = False
                    assert self.transport is not None
                    self.transport.resume_reading()
                self.h11.receive_data(data if isinstance(data, bytes) else bytes(data))
            else:
                self.h11.receive_data(b"")


def _expire(future: asyncio.Future[None], what: str) -> None:
    if not future.done():
        future.set_exception(TimeoutError(what))


class PinnedPool:
    """Keep-alive connections to one upstream, each checked by `check` when it is new."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        check: Callable[[bytes | None, Connection], Awaitable[None]],
        *,
        timeout: float,
        max_connections: int,
        max_idle: int = 20,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
    ) -> None:
        self._host = host
        self._port = port
        self._context = context
        self._check = check
        self._timeout = timeout
        self._max_idle = max_idle
        self._keepalive = keepalive_seconds
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[Connection] = []
        self._active: set[Connection] = set()
        self._closed = False

    async def acquire(self, *, fresh: bool = False) -> Connection:
        """An idle connection (unless `fresh`) or a new, checked one; holds a slot until
        `release`. Raises OSError (ssl.SSLError included) when a new one cannot be made,
        and whatever `check` raises when its certificate is refused."""
        if self._closed:
            raise ConnectionAbortedError("the pool was closed (the attestation changed)")
        await self._take_slot()
        try:
            now = time.monotonic()
            while self._idle and not fresh:
                connection = self._idle.pop()
                if connection.usable() and now - connection.idle_since < self._keepalive:
                    connection.reused = True
                    self._active.add(connection)
                    return connection
                connection.abort()
            connection = await self._connect()
        except BaseException:
            self._slots.release()
            raise
        self._active.add(connection)
        return connection

    async def _take_slot(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # returns at once: a slot is free
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise UpstreamError("no upstream connection became free in time") from exc

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            transport, connection = await loop.create_connection(
                Connection,
                self._host,
                self._port,
                ssl=self._context,
                server_hostname=self._host,
                ssl_handshake_timeout=self._timeout,
            )
        ssl_object = transport.get_extra_info("ssl_object")
        presented = ssl_object.getpeercert(True) if ssl_object is not None else None
        try:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._check(presented, connection)
            if self._closed:
                raise ConnectionAbortedError("the pool was closed (the attestation changed)")
        except BaseException:
            connection.abort()  # never leave the socket to the garbage collector
            raise
        return connection

    def release(self, connection: Connection, *, reusable: bool) -> None:
        """Gives the slot back; keeps the connection for the next request if `reusable`."""
        if connection not in self._active:
            return
        self._active.discard(connection)
        self._slots.release()
        if (
            reusable
            and not self._closed
            and connection.usable()
            and connection.h11.our_state is h11.DONE
            and connection.h11.their_state is h11.DONE
            and len(self._idle) < self._max_idle
        ):
            connection.h11.start_next_cycle()
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.abort()

    def aclose(self) -> None:
        """Aborts every connection, idle or in use; later `acquire`s fail."""
        self._closed = True
        for connection in [*self._idle, *self._active]:
            connection.abort()
        self._idle.clear()


# -- one exchange on a connection --------------------------------------------------------------


async def send_head(
    connection: Connection, request: h11.Request, body: bytes, complete: bool, timeout: float
) -> None:
    """Writes the head and the body's first part (the whole body when `complete`) in one
    write. `request` was built (and so validated by h11) before the connection was taken."""
    connection.received = 0
    connection.body_total = 0
    data = connection.h11.send(request) or b""
    if body:
        data += connection.h11.send(h11.Data(data=body)) or b""
    if complete:
        data += connection.h11.send(h11.EndOfMessage()) or b""
    await connection.write(data, timeout)


async def send_body(connection: Connection, chunk: bytes, timeout: float) -> None:
    if chunk:
        await connection.write(connection.h11.send(h11.Data(data=chunk)) or b"", timeout)


async def end_body(connection: Connection, timeout: float) -> None:
    await connection.write(connection.h11.send(h11.EndOfMessage()) or b"", timeout)


async def read_head(connection: Connection, timeout: float) -> h11.Response:
    """The response's head (1xx skipped). `StaleConnection` when a reused connection was
    closed before any byte of it arrived: the request may go again on a new connection."""
    while True:
        try:
            event = await connection.next_event(timeout)
        except UpstreamError:
            if connection.reused and connection.received == 0 and connection.ended:
                raise StaleConnection("the upstream closed an idle connection") from None
            raise
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.InformationalResponse):
            continue
        if connection.reused and connection.received == 0:
            raise StaleConnection("the upstream closed an idle connection")
        raise UpstreamError("the upstream closed the connection without answering")


async def read_body(connection: Connection, limit: int, timeout: float) -> bytes | None:
    """The next part of the response body as it arrives (h11 hands over what has come),
    None at its end; `ResponseTooLarge` once the total passes `limit`."""
    event = await connection.next_event(timeout)
    if isinstance(event, h11.Data):
        connection.body_total += len(event.data)
        if connection.body_total > limit:
            raise ResponseTooLarge(f"the upstream's response is larger than {limit} bytes")
        return bytes(event.data)
    if isinstance(event, h11.EndOfMessage):
        return None
    raise UpstreamError("the upstream closed the connection before the end of its answer")


__all__ = [
    "MAX_HEAD_BYTES",
    "Connection",
    "PinnedPool",
    "ResponseTooLarge",
    "StaleConnection",
    "UpstreamError",
    "end_body",
    "read_body",
    "read_head",
    "send_body",
    "send_head",
]
