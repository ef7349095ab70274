"""One TLS record and one send per small response, instead of one for the head and one for
the body: shared by the inference server and the attesting proxy.

uvicorn writes a response's head (`http.response.start`) and its body in two `write`
calls, and an event loop's transport sends each at once (over TLS: a record each). The
client, blocked in its read, wakes for the head, parses it, sleeps and wakes again for the
body; on a busy 2-core machine each wake-up costs a scheduling slot (docs/performance.md,
"Inference fixed cost: what was changed" and "attesting proxy per request").

`CoalescedWrites` wraps a connection's transport: writes made in one step of the event
loop are joined and sent in one call at the end of that step (`call_soon`), or at once from
`FLUSH_BYTES` on, so large and streamed bodies keep the transport's flow control (it pauses
the protocol as before). Nothing is reordered or held past the current step; `close`
sends what is pending first, `abort` drops it, as the transport itself would.
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


def coalesce_writes(protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """`protocol_class` (uvicorn's HTTP/1.1 protocol) on `CoalescedWrites`."""

    def connection_made(self: Any, transport: asyncio.BaseTransport) -> None:
        # duck-typed: uvloop's transports are not asyncio.Transport subclasses either
        wrapped: Any = CoalescedWrites(transport)  # type: ignore[arg-type]
        protocol_class.connection_made(self, wrapped)

    name = f"CoalesceWrites{protocol_class.__name__}"
    protocol: type[asyncio.Protocol] = type(
        name, (protocol_class,), {"connection_made": connection_made}
    )
    return protocol


__all__ = ["FLUSH_BYTES", "CoalescedWrites", "coalesce_writes"]
