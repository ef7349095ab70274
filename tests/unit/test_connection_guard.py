"""The head deadline of `connection_guard.guard_connections` in process, on a stand-in
for uvicorn's protocol: a head that comes whole in one read (nearly every request) needs
no timer and gets none; a head still incomplete after a read gets its deadline, counted
from its first byte, and a slow one (slowloris) on a kept-alive connection is answered
408 when it passes, exactly as on a new connection (tests/e2e/test_connection_limits_e2e.py
runs the attacks against a real server)."""

from __future__ import annotations

import asyncio
from typing import Any

from blindinfer.server.config import ConnectionLimits
from blindinfer.server.connection_guard import ConnectionGuard, guard_connections

HEADER_TIMEOUT_S = 0.2
HEAD = b"GET /v2/health/live HTTP/1.1\r\nHost: blindinfer\r\n\r\n"


class StandInHttp(asyncio.Protocol):
    """What the guard uses of uvicorn's httptools protocol: the loop, the transport,
    the parser callbacks for each head, and `on_response_complete` keeping it alive."""

    def __init__(self) -> None:
        self.loop: Any = asyncio.get_running_loop()
        self.transport: Any = None
        self.cycle: Any = None
        self.timeout_keep_alive_task: Any = None
        self.heads = 0
        self._buffer = b""
        self._in_head = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer:
            if not self._in_head:
                self._in_head = True
                self.on_message_begin()
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                self.on_header(name, value.strip())
            self._in_head = False
            self.on_headers_complete()

    def on_message_begin(self) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_headers_complete(self) -> None:
        self.heads += 1

    def on_response_complete(self) -> None:
        self.timeout_keep_alive_task = object()  # kept alive for the next request

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.paused = False
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    close = abort


class CountingLoop:
    """The running loop, counting the timers armed through it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.timers = 0

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_at(when, callback, *args)

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_later(delay, callback, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def _connection() -> tuple[Any, Transport, CountingLoop]:
    limits = ConnectionLimits(header_timeout_s=HEADER_TIMEOUT_S)
    protocol_class = guard_connections(StandInHttp, ConnectionGuard(limits, 8), None)
    connection: Any = protocol_class()
    loop = CountingLoop(connection.loop)
    connection.loop = loop
    transport = Transport()
    connection.connection_made(transport)
    return connection, transport, loop


def _serve_one(connection: Any) -> None:
    """The first head, whole, and its response: the connection is idle afterwards."""
    connection.data_received(HEAD)
    assert connection.heads == 1
    connection.on_response_complete()


def test_a_whole_head_on_a_kept_alive_connection_arms_no_timer() -> None:
    async def run() -> None:
        connection, transport, loop = _connection()
        _serve_one(connection)
        armed = loop.timers
        for served in range(2, 5):
            connection.data_received(HEAD)
            assert connection.heads == served
            connection.on_response_complete()
        assert loop.timers == armed  # three requests, not one timer
        assert transport.written == b""

    asyncio.run(run())


def test_a_slow_head_on_a_kept_alive_connection_is_answered_408_at_its_deadline() -> None:
    async def run() -> None:
        connection, transport, loop = _connection()
        _serve_one(connection)
        started = loop.time()
        connection.data_received(b"GET /v2/health/live HTTP/1.1\r\nX-Slow: ")
        while not transport.written and loop.time() - started < HEADER_TIMEOUT_S * 10:
            await asyncio.sleep(HEADER_TIMEOUT_S / 8)
            if not transport.paused:
                connection.data_received(b"a")  # slowloris: a byte now and then
        waited = loop.time() - started
        assert transport.written.startswith(b"HTTP/1.1 408 "), transport.written
        assert b"connection: close" in transport.written and transport.paused
        assert HEADER_TIMEOUT_S * 0.9 <= waited < HEADER_TIMEOUT_S * 3  # from its first byte
        assert connection.heads == 1

    asyncio.run(run())


def test_a_pipelined_head_cut_short_gets_its_deadline() -> None:
    async def run() -> None:
        connection, transport, _ = _connection()
        _serve_one(connection)
        connection.data_received(HEAD + b"GET /v2 HTTP/1.1\r\n")  # one whole, one begun
        assert connection.heads == 2
        assert connection._g_timer is not None  # the begun one's deadline
        await asyncio.sleep(HEADER_TIMEOUT_S * 1.5)
        assert transport.closing  # behind a request still served: closed, as always

    asyncio.run(run())


def test_the_first_head_keeps_the_deadline_of_the_accept() -> None:
    async def run() -> None:
        connection, transport, loop = _connection()
        assert loop.timers == 1  # armed at connection_made, for handshake and head
        timer = connection._g_timer
        connection.data_received(b"GET /v2 HTTP/1.1\r\n")
        assert connection._g_timer is timer and loop.timers == 1
        await asyncio.sleep(HEADER_TIMEOUT_S * 1.5)
        assert transport.written.startswith(b"HTTP/1.1 408 "), transport.written

    asyncio.run(run())
