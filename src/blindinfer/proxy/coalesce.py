"""One system call per small response on the proxy's local side.

uvicorn writes a response's head (`http.response.start`) and its body in two `write`
calls, and an event loop's transport sends each at once. On loopback each send wakes the
client: it reads the head, parses it, sleeps again until the body arrives, and wakes a
second time. Profiled (py-spy --native on the proxy, MLP batch 1), the head's write was
~10% of the proxy's busy time, most of it waking the client (docs/performance.md,
"attesting proxy per request").

`CoalescedWrites` wraps the connection's transport: writes made in one step of the event
loop are joined and sent in one call at the end of that step (`call_soon`), or at once from
`FLUSH_BYTES` on, so large and streamed bodies keep the transport's flow control (it pauses
the protocol as before). Nothing is reordered or held past the current step; `close`
sends what is pending first. (server/coalesce.py does the same for the server; the proxy,
client-side code, imports nothing from the server.)
"""

from __future__ import annotations

import asyncio
from typing import Any

FLUSH_BYTES = 1 << 16


class CoalescedWrites:
    """A transport whose writes within one event-loop step leave in one call."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._size = 0
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(data if isinstance(data, bytes) else bytes(data))
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_scheduled)

    def writelines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.write(line)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def _flush_scheduled(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._size = 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        # get_extra_info, pause_reading, resume_reading, set_protocol, ...: the transport's
        return getattr(self._transport, name)


def coalescing_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) on `CoalescedWrites`."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    def connection_made(self: Any, transport: asyncio.Transport) -> None:
        wrapped: Any = CoalescedWrites(transport)  # duck-typed: what uvicorn calls on one
        AutoHTTPProtocol.connection_made(self, wrapped)

    protocol: type[asyncio.Protocol] = type(
        "CoalescedHTTPProtocol", (AutoHTTPProtocol,), {"connection_made": connection_made}
    )
    return protocol


__all__ = ["FLUSH_BYTES", "CoalescedWrites", "coalescing_protocol"]
