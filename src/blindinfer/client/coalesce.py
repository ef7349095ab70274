"""One TLS record and one send per request, instead of one for the head and one for the body.

httpcore writes a request's head and its body separately. Over TLS each write is a record
and a send: the server wakes for the head, parses it, goes back to sleep and wakes again
for the body; on a busy 2-core machine each wake-up costs a scheduling slot. Measured side
by side: ~0.2 ms of a 1.9 ms small request (docs/performance.md, "Inference fixed cost:
what was changed").

The pinned connection's streams therefore hold small writes back until the next read
(a request is always written whole before its response is read) or until they add up to
`HOLD_BYTES`, when they go out together. Large bodies and streamed uploads are written
as before, chunk by chunk. A write that fails when the held bytes go out at the read is
dropped, as httpcore drops its own failed body writes, so that a response the server sent
early (a 413 to a body it refuses) is still read.
"""

from __future__ import annotations

import contextlib
import ssl
import typing
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from blindinfer.client.replica_gate import GatedBackend, KeyGate

HOLD_BYTES = 64 * 1024
"""Writes are held back until this many bytes wait (or a read comes)."""

ENABLED = True
"""False: plain httpx transports (bench/bench_fixed_cost.py measures both in one run)."""

SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)
_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)
"""httpx's own defaults."""


class _CoalescingStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._held.append(bytes(buffer))
        self._held_bytes += len(buffer)
        if self._held_bytes >= HOLD_BYTES:
            self._flush(timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:
            # as httpcore does: the server may have answered before it stopped reading
            with contextlib.suppress(httpcore.WriteError):
                self._flush(timeout)
        return self._stream.read(max_bytes, timeout)

    def _flush(self, timeout: float | None) -> None:
        data = b"".join(self._held)
        self._held, self._held_bytes = [], 0
        self._stream.write(data, timeout)

    def close(self) -> None:
        self._held, self._held_bytes = [], 0
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _CoalescingStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class CoalescingBackend(httpcore.NetworkBackend):
    """httpcore's synchronous backend, its streams coalescing writes (module docstring)."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        return _CoalescingStream(
            self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        )

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        return _CoalescingStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def coalescing_transport(
    context: ssl.SSLContext,
    socket_options: typing.Sequence[SocketOption],
    limits: httpx.Limits = _DEFAULT_LIMITS,
    gate: KeyGate | None = None,
) -> httpx.HTTPTransport:
    """httpx's transport on a connection pool whose streams coalesce writes.

    httpx takes no network backend, so its pool (built by HTTPTransport from the same
    arguments, with no proxy) is replaced by one that has it; httpx is pinned to 0.28.
    `gate`: a replica-set client's key check (client/replica_gate.py), run by every new
    connection right after its handshake, before the request.
    """
    transport = httpx.HTTPTransport(verify=context, socket_options=socket_options, limits=limits)
    if not ENABLED and gate is None:
        return transport
    backend: typing.Any = CoalescingBackend() if ENABLED else httpcore.SyncBackend()
    if gate is not None:
        backend = GatedBackend(backend, gate, httpcore)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        socket_options=socket_options,
        network_backend=backend,
    )
    return transport
