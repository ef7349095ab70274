"""One TLS record and one send per response, instead of one for the head and one for the body.

uvicorn writes a response's status line and headers as soon as the app sends
`http.response.start`, and the body with the next message. Over TLS each write is a record
and a send, and the client, blocked in its read, wakes for the head, parses it, sleeps
and wakes again for the body. The app sends both in the same turn of the event loop, so
the writes of one turn are held and go out together at the end of it (`call_soon`):
one record, one send, one wake-up (docs/performance.md, "Inference fixed cost: what was
changed"). Streamed responses still leave chunk by chunk, each in its own turn.

`close()` sends what is held first; `abort()` drops it, as the transport itself would.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast


class _CoalescingTransport:
    """The connection's transport, its writes of one loop turn sent as one."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            asyncio.get_running_loop().call_soon(self._flush)
        self._held.append(bytes(data))

    def writelines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.write(line)

    def _flush(self) -> None:
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held = []
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()


def coalesce_writes(protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """`protocol_class` (uvicorn's HTTP/1.1 protocol) whose writes of one loop turn leave
    as one (module docstring)."""

    class CoalesceWrites(protocol_class):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses, but quack alike
            super().connection_made(_CoalescingTransport(cast(asyncio.Transport, transport)))

    CoalesceWrites.__qualname__ = CoalesceWrites.__name__ = (
        f"CoalesceWrites{protocol_class.__name__}"
    )
    return CoalesceWrites
