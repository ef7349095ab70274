"""The proxy's local side sends a response's head and body in one write, in order, and
never holds bytes past the current event-loop step (asgi/coalesce.py, shared with the server)."""

from __future__ import annotations

import asyncio
import socket

from blindinfer.asgi.coalesce import FLUSH_BYTES, CoalescedWrites


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport


async def _pair() -> tuple[asyncio.Transport, socket.socket, list[bytes]]:
    """A real transport on one end of a socket pair; the other end, and a log of the
    transport's write calls."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(_Recorder, sock=ours)
    assert isinstance(transport, asyncio.Transport)
    calls: list[bytes] = []
    write = transport.write

    def recording(data: bytes | bytearray | memoryview) -> None:
        calls.append(bytes(data))
        write(data)

    transport.write = recording  # type: ignore[method-assign]
    theirs.setblocking(False)
    return transport, theirs, calls


def _received(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_head_and_body_leave_in_one_write_at_the_end_of_the_step() -> None:
    async def scenario() -> None:
        transport, peer, calls = await _pair()
        wrapped = CoalescedWrites(transport)
        wrapped.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        wrapped.write(b"ok")
        assert calls == []  # held until this step ends
        await asyncio.sleep(0)
        assert calls == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        await asyncio.sleep(0.01)
        assert _received(peer) == calls[0]
        wrapped.close()
        peer.close()

    asyncio.run(scenario())


def test_large_writes_go_at_once_and_close_sends_what_is_pending() -> None:
    async def scenario() -> None:
        transport, peer, calls = await _pair()
        wrapped = CoalescedWrites(transport)
        big = b"x" * FLUSH_BYTES
        wrapped.write(b"head")
        wrapped.write(big)
        assert calls == [b"head" + big]  # no waiting: flow control stays the transport's
        wrapped.write(b"tail")
        wrapped.close()  # before the step ends: flushed first, then closed
        assert calls[-1] == b"tail"
        assert wrapped.is_closing()
        await asyncio.sleep(0.01)
        assert _received(peer) == b"head" + big + b"tail"
        peer.close()

    asyncio.run(scenario())


def test_nothing_is_written_after_abort() -> None:
    async def scenario() -> None:
        transport, peer, calls = await _pair()
        wrapped = CoalescedWrites(transport)
        wrapped.write(b"partial")
        wrapped.abort()
        await asyncio.sleep(0)
        assert calls == []
        peer.close()

    asyncio.run(scenario())
