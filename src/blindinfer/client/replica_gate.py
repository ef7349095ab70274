"""The one check every new connection of a replica-set client passes before a request byte.

`connect(url, replicas=N)` with N > 1 talks to several replicas behind one address (a TCP
load balancer, a Kubernetes Service): each has its own TLS key and evidence, and any new
connection may land on any of them. The TLS context therefore accepts any certificate
(`gated_context`: the handshake still proves that the peer holds the private key of the
certificate it presented), and right after the handshake, before anything else is written,
`KeyGate.check` looks the presented certificate up in the client's `AttestedKeys`:

- known and young enough: the connection goes on;
- unknown (or too old): on THIS connection, `POST /v2/attestation` with a fresh nonce and
  `GET /v2/attestation` (the boot evidence its receipts name); the evidence is verified with
  the client's policy, simulation and collateral settings and must bind this certificate;
  then the key is admitted (the set is bounded: `attested_keys.py`) and the connection goes
  on. Any failure closes the connection and fails the request: nothing of it was sent.

The same check runs in every transport: `check` for sockets and httpcore's sync streams
(the pinned fast path `pinned_http.py`, httpx's sync pool, the openai SDK's httpx2 pool),
`acheck` for the async ones, through `GatedBackend` / `AsyncGatedBackend`, which wrap a
network backend of httpcore or httpcore2 so that their `start_tls` ends with the check.
A connection closed by the peer during the check is a connection error (nothing sent: safe
to retry), never "bad evidence".
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast
from urllib.parse import urlsplit

import httpx

from blindinfer.attestation.bundle import EvidenceBundle
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.client.attested_keys import AttestedKey, AttestedKeys
from blindinfer.client.connection_evidence import BootEvidenceExchange, EvidenceExchange
from blindinfer.client.transport import translated_errors
from blindinfer.errors import ProtocolError

ATTESTED_KEY = "blindinfer_attested_key"
"""`get_extra_info` name under which a gated stream answers the AttestedKey it checked."""
READ_BYTES = 64 * 1024

Verify = Callable[[EvidenceBundle], tuple[VerifiedAttestation, EvidenceBundle]]
"""Verifies a bundle with the client's policy (raises an AttestationError otherwise);
returns the attestation and the bundle as verified (with collateral added, if fetched)."""


class ClosedDuringAttestation(ConnectionError):
    """The peer closed the connection during the check: nothing of the request was sent."""


def gated_context() -> ssl.SSLContext:
    """TLS that accepts any certificate: trust comes from `KeyGate.check` right after."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peer_certificate(ssl_object: object) -> bytes:
    """The DER certificate the handshake presented; ProtocolError when there was none."""
    getpeercert = getattr(ssl_object, "getpeercert", None)
    certificate = getpeercert(True) if callable(getpeercert) else None
    if not isinstance(certificate, bytes) or not certificate:
        raise ProtocolError("no_certificate", "the TLS handshake presented no certificate")
    return certificate


class KeyGate:
    """Admits the key of a new connection, on that connection (module docstring)."""

    def __init__(self, url: str, keys: AttestedKeys, verify: Verify) -> None:
        self.url = url
        self.keys = keys
        self._verify = verify
        self._host = httpx.URL(url).netloc.decode("ascii")

    def current(self, key: AttestedKey) -> bool:
        """Whether `key` is still trusted (not forgotten, attested within the age bound: by
        the attestation that admitted it or by a newer one of the same key)."""
        return self.keys.lookup(key.certificate_der) is not None

    def check(
        self, certificate: bytes, send: Callable[[bytes], None], receive: Callable[[], bytes]
    ) -> AttestedKey:
        """The key's admission, attesting it first over `send`/`receive` if it is not known."""
        known = self.keys.lookup(certificate)
        if known is not None:
            return known
        exchange = EvidenceExchange(self.url, self._host)
        boot = BootEvidenceExchange(self._host)
        send(exchange.request.data)
        body = _drive(exchange.receive, receive)
        _reusable(exchange)
        send(boot.data)
        boot_body = _drive(boot.receive, receive)
        return self._admit(exchange, body, boot, boot_body, certificate)

    async def acheck(
        self,
        certificate: bytes,
        send: Callable[[bytes], Awaitable[None]],
        receive: Callable[[], Awaitable[bytes]],
    ) -> AttestedKey:
        """`check` for asyncio streams (the verification runs on the loop: ~ms, once a key)."""
        known = self.keys.lookup(certificate)
        if known is not None:
            return known
        exchange = EvidenceExchange(self.url, self._host)
        boot = BootEvidenceExchange(self._host)
        await send(exchange.request.data)
        body = await _adrive(exchange.receive, receive)
        _reusable(exchange)
        await send(boot.data)
        boot_body = await _adrive(boot.receive, receive)
        return self._admit(exchange, body, boot, boot_body, certificate)

    def _admit(
        self,
        exchange: EvidenceExchange,
        body: bytes,
        boot: BootEvidenceExchange,
        boot_body: bytes,
        certificate: bytes,
    ) -> AttestedKey:
        attestation, bundle = self._verify(exchange.bundle(body, certificate))
        admitted = self.keys.admit(attestation, bundle, boot_body)
        _reusable(boot)
        return admitted


def _reusable(exchange: EvidenceExchange | BootEvidenceExchange) -> None:
    """The connection carries nothing more than the answer and stays open (else nothing
    more is sent on it: a retryable connection failure)."""
    if not exchange.reusable:
        raise ClosedDuringAttestation("the server closed the connection after its evidence")


def _closed_check(data: bytes) -> bytes:
    if not data:
        raise ClosedDuringAttestation("the server closed the connection during attestation")
    return data


def _drive(feed: Callable[[bytes], bytes | None], receive: Callable[[], bytes]) -> bytes:
    while True:
        body = feed(_closed_check(receive()))
        if body is not None:
            return body


async def _adrive(
    feed: Callable[[bytes], bytes | None], receive: Callable[[], Awaitable[bytes]]
) -> bytes:
    while True:
        body = feed(_closed_check(await receive()))
        if body is not None:
            return body


# -- httpcore / httpcore2 network backends whose start_tls ends with the check -------------


class _Errors:
    """The exception classes of one httpcore flavour (httpcore or httpcore2)."""

    def __init__(self, module: Any) -> None:
        self.connect: type[Exception] = module.ConnectError
        self.io: tuple[type[BaseException], ...] = (
            module.ReadError,
            module.WriteError,
            ConnectionError,
        )


class _GatedStream:
    def __init__(self, stream: Any, backend: GatedBackend, key: AttestedKey | None) -> None:
        self._stream = stream
        self._backend = backend
        self._key = key

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data: bytes = self._stream.read(max_bytes, timeout)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> _GatedStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, timeout)
        try:
            key = self._backend.gate.check(
                peer_certificate(tls.get_extra_info("ssl_object")),
                lambda data: tls.write(data, timeout),
                lambda: tls.read(READ_BYTES, timeout),
            )
        except self._backend.errors.io as exc:
            tls.close()
            raise self._backend.errors.connect(str(exc)) from exc
        except BaseException:
            tls.close()
            raise
        return _GatedStream(tls, self._backend, key)

    def get_extra_info(self, info: str) -> Any:
        if info == ATTESTED_KEY:
            return self._key
        return self._stream.get_extra_info(info)


class GatedBackend:
    """A sync httpcore(2) network backend whose TLS streams pass `KeyGate.check`."""

    def __init__(self, inner: Any, gate: KeyGate, module: Any) -> None:
        self._inner = inner
        self.gate = gate
        self.errors = _Errors(module)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> _GatedStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _GatedStream(stream, self, None)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> _GatedStream:
        stream = self._inner.connect_unix_socket(path, timeout, socket_options)
        return _GatedStream(stream, self, None)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncGatedStream:
    def __init__(self, stream: Any, backend: AsyncGatedBackend, key: AttestedKey | None) -> None:
        self._stream = stream
        self._backend = backend
        self._key = key

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data: bytes = await self._stream.read(max_bytes, timeout)
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> _AsyncGatedStream:
        tls = await self._stream.start_tls(ssl_context, server_hostname, timeout)

        async def send(data: bytes) -> None:
            await tls.write(data, timeout)

        async def receive() -> bytes:
            data: bytes = await tls.read(READ_BYTES, timeout)
            return data

        try:
            certificate = peer_certificate(tls.get_extra_info("ssl_object"))
            key = await self._backend.gate.acheck(certificate, send, receive)
        except self._backend.errors.io as exc:
            await tls.aclose()
            raise self._backend.errors.connect(str(exc)) from exc
        except BaseException:
            await tls.aclose()
            raise
        return _AsyncGatedStream(tls, self._backend, key)

    def get_extra_info(self, info: str) -> Any:
        if info == ATTESTED_KEY:
            return self._key
        return self._stream.get_extra_info(info)


class AsyncGatedBackend:
    """An async httpcore(2) network backend whose TLS streams pass `KeyGate.acheck`."""

    def __init__(self, inner: Any, gate: KeyGate, module: Any) -> None:
        self._inner = inner
        self.gate = gate
        self.errors = _Errors(module)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> _AsyncGatedStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncGatedStream(stream, self, None)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> _AsyncGatedStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _AsyncGatedStream(stream, self, None)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def attested_key_of(response: Any) -> AttestedKey | None:
    """The AttestedKey of the connection that carried an httpx response (replica mode)."""
    extensions = getattr(response, "extensions", None) or {}
    key = extensions.get(ATTESTED_KEY)
    if isinstance(key, AttestedKey):
        return key
    stream = extensions.get("network_stream")
    key = stream.get_extra_info(ATTESTED_KEY) if stream is not None else None
    return key if isinstance(key, AttestedKey) else None


def gated_async_transport(
    gate: KeyGate, socket_options: Any, limits: httpx.Limits
) -> httpx.AsyncHTTPTransport:
    """httpx's async transport whose new connections pass `gate` (httpx is pinned to 0.28:
    its pool, built from the same arguments with no proxy, is replaced by one that has the
    gated network backend; client/coalesce.py does the same for the sync transport)."""
    import httpcore

    context = gated_context()
    transport = httpx.AsyncHTTPTransport(
        verify=context, socket_options=socket_options, limits=limits
    )
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        socket_options=socket_options,
        network_backend=cast(Any, AsyncGatedBackend(httpcore.AnyIOBackend(), gate, httpcore)),
    )
    return transport


def gated_httpx2_transport(gate: KeyGate, *, asynchronous: bool) -> Any:
    """The openai SDK's httpx2 transport whose new connections pass `gate` (as above)."""
    import httpcore2
    import httpx2

    context = gated_context()
    limits = httpx2.Limits(max_connections=100, max_keepalive_connections=20)
    options: dict[str, Any] = {
        "ssl_context": context,
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
    }
    if asynchronous:
        transport: Any = httpx2.AsyncHTTPTransport(verify=context, trust_env=False, limits=limits)
        backend: Any = AsyncGatedBackend(httpcore2.AnyIOBackend(), gate, httpcore2)
        transport._pool = httpcore2.AsyncConnectionPool(**options, network_backend=backend)
        return transport
    transport = httpx2.HTTPTransport(verify=context, trust_env=False, limits=limits)
    backend = GatedBackend(httpcore2.SyncBackend(), gate, httpcore2)
    transport._pool = httpcore2.ConnectionPool(**options, network_backend=backend)
    return transport


def attest_first(gate: KeyGate, timeout: float) -> AttestedKey:
    """Attests the key of one new connection to `gate.url` (what `connect()` does before it
    returns a replica-set client); failures as blindinfer errors."""
    parts = urlsplit(gate.url)
    host, port = parts.hostname or "", parts.port or 443
    with (
        translated_errors(gate.url, timeout, request="POST /v2/attestation", pinned=False),
        socket.create_connection((host, port), timeout=timeout) as raw,
        gated_context().wrap_socket(raw, server_hostname=host) as sock,
    ):
        return gate.check(peer_certificate(sock), sock.sendall, lambda: sock.recv(READ_BYTES))
