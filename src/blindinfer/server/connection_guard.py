"""Connections: how many, how long before a request head is in, and how large that head.

uvicorn bounds none of this: httptools takes a 64 MiB head (in quadratic time, before any
authentication) and 20,000 headers; a connection that never sends a byte, or sends its
head one byte at a time (slowloris), is kept forever; uvicorn's `limit_concurrency`
answers 503 but still accepts every socket, so idle connections can use up the process's
file descriptors. `guard_connections` wraps uvicorn's HTTP protocol class (as
connection.py does) so that:

- TLS is done here, with `loop.start_tls`, instead of by the server socket: then the
  connection is ours from accept, and the handshake falls under the head deadline (an
  idle TLS connection that never sends a byte is closed after --header-timeout-s);
- `ConnectionGuard` counts open connections (per listener group, one event loop): at
  --max-connections a new connection closes the oldest one that is not serving a request
  (in its handshake, its head, or idle between requests), or, if every one is serving,
  is itself closed at once;
- the TLS handshake and request head must be complete within --header-timeout-s of the
  accept (of the first byte of a later request on a kept-alive connection); a head
  larger than --max-header-bytes, or with more than --max-headers headers, is answered
  431 and the connection closed. Idle time between requests is uvicorn's keep-alive
  timeout (--keep-alive-s).

Every refusal here happens before the ASGI app sees the request: no route, no body.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from blindinfer.protocol.inference import encode_error
from blindinfer.server.config import ConnectionLimits
from blindinfer.server.connection import LINGER_S

_HEAD, _ACTIVE, _IDLE = "head", "active", "idle"


class ConnectionGuard:
    """The open connections of the listeners on one event loop, oldest first."""

    def __init__(self, limits: ConnectionLimits, max_connections: int | None = None) -> None:
        self.limits = limits
        self.max_connections = max_connections or limits.max_connections
        self._open: dict[Any, None] = {}  # insertion order: least recently idle first

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, connection: Any) -> bool:
        """Counts `connection` in; False if it must be closed (every slot is serving)."""
        if len(self._open) >= self.max_connections:
            victim = next((c for c in self._open if c.guard_evictable()), None)
            if victim is None:
                return False
            self.release(victim)
            victim.guard_abort()
        self._open[connection] = None
        return True

    def idle(self, connection: Any) -> None:
        """`connection` waits for its next request: now the youngest idle one."""
        if self._open.pop(connection, False) is None:
            self._open[connection] = None

    def release(self, connection: Any) -> None:
        self._open.pop(connection, None)


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = encode_error(code, message)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _feed(protocol: Any, data: bytes) -> None:
    """Hands `data` to a transport's protocol as if the transport had read it."""
    if not hasattr(protocol, "buffer_updated"):
        protocol.data_received(data)
        return
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


def guard_connections(
    protocol_class: type[asyncio.Protocol],
    guard: ConnectionGuard,
    ssl_context: ssl.SSLContext | None,
) -> type[asyncio.Protocol]:
    """`protocol_class` (uvicorn's httptools protocol, possibly already wrapped) with the
    bounds of the module docstring; it does TLS with `ssl_context` itself (give uvicorn
    no `ssl` then)."""
    limits = guard.limits

    class GuardedConnection(protocol_class):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._g_raw: asyncio.Transport | None = None
            self._g_timer: asyncio.TimerHandle | None = None
            self._g_phase = _HEAD
            self._g_head_bytes = 0
            self._g_headers = 0
            self._g_refused = False
            self._g_connected = False
            self._g_lost = False
            self._g_pending: list[bytes] = []
            self._g_tls_started = False
            self._g_feeding = False  # inside data_received (see _g_begin_head)
            self._g_deadline = 0.0  # of the head being received (loop time)

        # ---- the guard's view

        def guard_evictable(self) -> bool:
            if self._g_phase == _ACTIVE:
                return False
            cycle = getattr(self, "cycle", None)
            return cycle is None or bool(cycle.response_complete)

        def guard_abort(self) -> None:
            self._g_lost = True  # no connection_made after this (see _g_tls_ready)
            self._g_cancel_timer()
            if self._g_raw is not None and not self._g_raw.is_closing():
                self._g_raw.abort()

        def _g_cancel_timer(self) -> None:
            if self._g_timer is not None:
                self._g_timer.cancel()
                self._g_timer = None

        def _g_arm(self) -> None:
            self._g_cancel_timer()
            self._g_timer = self.loop.call_later(limits.header_timeout_s, self._g_expired)

        def _g_expired(self) -> None:
            self._g_timer = None
            if self._g_phase == _ACTIVE:
                return
            if self._g_connected and self._g_head_bytes and not self._g_refused:
                self._g_refuse(
                    408,
                    "Request Timeout",
                    "request_timeout",
                    f"the request head did not arrive within {limits.header_timeout_s:g} s "
                    "(--header-timeout-s)",
                )
            else:
                guard.release(self)
                self.guard_abort()

        def _g_refuse(self, status: int, reason: str, code: str, message: str) -> None:
            """Answers `status` and closes: stops reading (the client may still be
            sending its head), gives the answer LINGER_S to leave, then aborts."""
            self._g_refused = True
            self._g_cancel_timer()
            guard.release(self)
            raw = self._g_raw
            if raw is None or raw.is_closing():
                return
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                self.guard_abort()  # a pipelined head behind a response still being sent
                return
            self.transport.write(_raw_response(status, reason, code, message))
            raw.pause_reading()
            self.loop.call_later(LINGER_S, self.guard_abort)

        # ---- asyncio.Protocol

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            raw: asyncio.Transport = transport  # type: ignore[assignment]
            self._g_raw = raw
            if not guard.admit(self):
                raw.abort()
                self._g_lost = True
                return
            self._g_arm()
            if ssl_context is None:
                self._g_connected = True
                super().connection_made(transport)
            else:
                raw.pause_reading()  # the ClientHello is for start_tls, not for us
                self.loop.call_soon(self._g_start_tls, raw, ssl_context)

        def _g_start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
            """Runs `loop.start_tls` up to its wait for the handshake, here and now, then
            hands it what the client sent before (see `_g_early`), so that no byte can
            reach the TLS layer out of order; the rest runs when the handshake ends."""
            if self._g_lost:
                return
            coroutine = self.loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=limits.header_timeout_s,
                ssl_shutdown_timeout=limits.header_timeout_s,  # a closing one goes soon too
            )
            try:
                waiter = coroutine.send(None)
            except BaseException:  # a transport already closing: gone
                self._g_gone()
                return
            self._g_tls_started = True  # from now on, early data is decrypted data
            early, self._g_pending = b"".join(self._g_pending), []
            if early:
                # after start_tls' own callbacks (connection_made, resume_reading), in the
                # same turn of the loop: before the transport is read again
                self.loop.call_soon(_feed, raw.get_protocol(), early)

            def handshake_done(_: object) -> None:
                try:
                    coroutine.send(None)
                except StopIteration as done:
                    self._g_tls_ready(done.value)
                except BaseException:  # a failed or timed-out handshake: just gone
                    self._g_gone()
                else:  # start_tls waits once only
                    coroutine.close()
                    self._g_gone()

            waiter.add_done_callback(handshake_done)

        def _g_tls_ready(self, tls: asyncio.Transport | None) -> None:
            # uvloop ends the handshake without an error when the connection is aborted
            # during it: then no connection_lost would ever follow a connection_made
            raw = self._g_raw
            if self._g_lost or tls is None or tls.is_closing() or raw is None or raw.is_closing():
                self._g_gone()
                return
            self._g_connected = True
            super().connection_made(tls)
            pending, self._g_pending = self._g_pending, []
            for data in pending:
                if self._g_refused or self._g_lost:
                    break
                self.data_received(data)

        def _g_gone(self) -> None:
            self._g_lost = True
            self._g_cancel_timer()
            guard.release(self)
            if self._g_raw is not None and not self._g_raw.is_closing():
                self._g_raw.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            self._g_lost = True
            self._g_cancel_timer()
            guard.release(self)
            if self._g_connected:
                super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._g_feeding:  # re-entered: no deadline to look after here
                self._g_received(data)
                return
            self._g_feeding = True
            try:
                self._g_received(data)
            finally:
                self._g_feeding = False
            # a head still incomplete after these bytes has its deadline armed now; one
            # that came whole in them (nearly every request) never needed a timer
            if (
                self._g_phase == _HEAD
                and self._g_timer is None
                and self._g_connected
                and not (self._g_refused or self._g_lost)
            ):
                self._g_timer = self.loop.call_at(self._g_deadline, self._g_expired)

        def _g_received(self, data: bytes) -> None:
            if self._g_refused:
                return
            if not self._g_connected:  # see _g_early
                self._g_early(data)
                return
            if self._g_phase == _IDLE:
                self._g_begin_head()
            if self._g_phase == _HEAD:
                room = limits.max_header_bytes - self._g_head_bytes
                if len(data) > room:
                    self._g_head_bytes = limits.max_header_bytes
                    if room > 0:
                        super().data_received(data[:room])
                    if self._g_refused or self.transport.is_closing():
                        return
                    if self._g_phase == _HEAD:
                        self._g_too_large(f"larger than {limits.max_header_bytes} bytes")
                        return
                    data = data[room:]
                else:
                    self._g_head_bytes += len(data)
            super().data_received(data)

        def _g_early(self, data: bytes) -> None:
            """Bytes before the TLS layer is in place (uvloop starts reading after
            connection_made whatever it did): kept for `_g_start_tls`, and no more read
            until then; or decrypted bytes that came before `_g_tls_ready`. Bounded."""
            raw = self._g_raw
            if not self._g_tls_started and raw is not None and not raw.is_closing():
                raw.pause_reading()
            self._g_pending.append(data)
            if sum(map(len, self._g_pending)) > limits.max_header_bytes:
                self._g_gone()

        def _g_begin_head(self) -> None:
            """The first bytes of a head (of a later request on the connection): its
            deadline runs from now. Within data_received the timer is armed only if the
            head is still incomplete at its end: a call_later and a cancel per request
            cost more than the rest of the guard, and no timer can fire while the loop
            is in data_received anyway."""
            self._g_phase = _HEAD
            self._g_head_bytes = 0
            self._g_headers = 0
            self._g_cancel_timer()
            self._g_deadline = self.loop.time() + limits.header_timeout_s
            if not self._g_feeding:
                self._g_timer = self.loop.call_at(self._g_deadline, self._g_expired)

        def _g_too_large(self, what: str) -> None:
            self._g_refuse(
                431,
                "Request Header Fields Too Large",
                "headers_too_large",
                f"the request head is {what} (--max-header-bytes {limits.max_header_bytes}, "
                f"--max-headers {limits.max_headers})",
            )

        # ---- parser callbacks (httptools)

        def on_message_begin(self) -> None:
            if self._g_phase != _HEAD:
                self._g_begin_head()
            self._g_headers = 0
            super().on_message_begin()

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._g_refused:
                return
            self._g_headers += 1
            if self._g_headers > limits.max_headers:
                self._g_too_large(f"more than {limits.max_headers} headers")
                return
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._g_refused:
                return
            self._g_phase = _ACTIVE
            self._g_cancel_timer()
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._g_refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._g_refused:
                super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if (
                self._g_phase == _ACTIVE
                and not self._g_refused
                and getattr(self, "timeout_keep_alive_task", None) is not None
            ):
                self._g_phase = _IDLE
                guard.idle(self)

        def shutdown(self) -> None:
            """The server is stopping. An idle connection is closed at once: the TLS close
            would wait up to --header-timeout-s for the client's close_notify, which an idle
            keep-alive client (a pool between requests) never sends, so a stopped server sat
            out that wait for every such client. The raw socket is closed after what the
            TLS layer queued (its close_notify), so the client sees an orderly end."""
            cycle = getattr(self, "cycle", None)
            idle = cycle is None or cycle.response_complete
            super().shutdown()
            raw = self._g_raw
            if idle and raw is not None and not raw.is_closing():
                raw.close()

    GuardedConnection.__qualname__ = GuardedConnection.__name__ = (
        f"Guarded{protocol_class.__name__}"
    )
    return GuardedConnection
