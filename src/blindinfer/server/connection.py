"""Closing a connection whose request body is still coming, so that the client hears.

An early refusal (413 for a declared 87 MiB, 401, 403, a bad name) is answered before the
body is read, with `Connection: close` (see `bodies.CloseUnreadBodies`). On TLS, uvicorn's
ordinary close is graceful: it sends close_notify and then keeps reading, and dropping,
whatever the client sends until it gets the client's close_notify. A client that writes
its whole body before reading the answer (httpx, curl, most do) would then send all of it
before it saw the refusal, the very wait the early refusal exists to spare.

So when the connection is closed while the current request's body is unfinished, this
protocol stops reading instead (the client's writes stall at once on a full window), gives
the answer already written `LINGER_S` to leave, then aborts the connection: the client's
next write fails with a reset, and it reads the answer that is waiting in its socket
(httpx does exactly that). Every other close is uvicorn's own.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

LINGER_S = 0.5
"""Between the last write of a refusal and the abort; Go's net/http waits as long."""


class _UnreadBodyTransport:
    """The connection's transport, with `close()` as described in the module docstring;
    everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, protocol: asyncio.Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def _body_unfinished(self) -> bool:
        cycle = getattr(self._protocol, "cycle", None)
        return (
            cycle is not None
            and bool(getattr(cycle, "more_body", False))
            and not getattr(cycle, "disconnected", True)
        )

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def resume_reading(self) -> None:
        if not self._lingering:
            self._transport.resume_reading()

    def close(self) -> None:
        if self._lingering or self._transport.is_closing():
            return
        if not self._body_unfinished():
            self._transport.close()
            return
        self._lingering = True
        self._transport.pause_reading()
        asyncio.get_running_loop().call_later(LINGER_S, self._transport.abort)


def abort_unread_bodies(protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """`protocol_class` (uvicorn's HTTP/1.1 protocol, httptools or h11) whose transport
    closes as the module docstring says."""

    class AbortUnreadBodies(protocol_class):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses, but quack alike
            super().connection_made(_UnreadBodyTransport(cast(asyncio.Transport, transport), self))

    AbortUnreadBodies.__qualname__ = AbortUnreadBodies.__name__ = (
        f"AbortUnreadBodies{protocol_class.__name__}"
    )
    return AbortUnreadBodies
