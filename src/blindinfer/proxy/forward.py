"""An attesting proxy: any Open Inference Protocol client, over an attested channel.

`AttestingProxy` is an ASGI app. It verifies the upstream's evidence with blindinfer's own
client code (`capture` + `verify_bundle`: fresh nonce, quote chain to a pinned root,
binding of the TLS key, policy) before it forwards a single byte, then forwards plain
HTTP requests from the local machine to the upstream over TLS pinned to exactly the
attested certificate.

When it attests again:
- periodically (`reattest_seconds`), with a fresh nonce;
- on every reconnect: each new upstream TLS connection must present exactly the attested
  certificate (checked before any request byte is written on it), and is used only if an
  attestation was verified within the last `fresh_seconds`; otherwise the proxy attests
  again first. A server that restarted has a new key, so its handshake fails against the
  pin: the proxy attests the new server and forwards only if it satisfies the policy.
- after any failure, at most once per `retry_seconds`, when a request arrives.

With `replicas` > 1 (several replicas behind one address, each with its own key) the pin
is a bounded set of attested keys instead (client/replica_gate.py, as the client's
`connect(..., replicas=N)`): each new upstream connection whose key is not in the set is
attested on that connection (fresh nonce, same policy) before any request byte; at most
`replicas` keys, none attested longer ago than `max_attestation_age` seconds.

While there is no valid attestation, nothing is forwarded: every request gets 502
(evidence that failed verification or the policy) or 503 (upstream unreachable) with a
JSON body naming the attestation error class and its message. `GET /blindinfer/proxy`
answers the proxy's own status (never forwarded).

Before any of that, every local request passes `LocalGuard` (proxy/guard.py): its `Host`
must name the address it arrived on (DNS rebinding), a browser's cross-origin request
(`Origin`, `Sec-Fetch-Site`) is refused unless its origin was allowed, its Content-Type
must suit the route, and the access token is checked when one is set. The proxy can also
listen on a Unix socket (0600) instead of TCP.

Bodies stream both ways, bounded (`max_request_bytes`, `max_response_bytes`); hop-by-hop
headers are dropped; `Authorization` from local callers is dropped unless
`forward_client_authorization`, and the proxy's own API key is added on the pinned
channel only. The proxy's own error answers take the shape of the API the path belongs to
(OpenAI's on /v1, `blindinfer.protocol.error_shapes`).

The upstream side is the proxy's own (proxy/upstream.py): a pool of pinned TLS
connections on this event loop, HTTP/1.1 by h11, the pin checked on each new connection
before its first request byte. httpx serves only the attestation (`capture`).

`uvicorn` (the local listener) is imported only by the runners below, not by the app.
With `grpc_listen`, the lifespan also starts a plaintext gRPC listener on the same loop
(proxy/grpc_forward.py) that forwards the OIP gRPC service under this same attestation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import h11
import httpx

from blindinfer.attestation.policy import Policy
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.client.attested_keys import (
    DEFAULT_MAX_AGE_SECONDS,
    check_replicas,
)
from blindinfer.client.client import capture, collateral_source, replica_set_gate, verify_bundle
from blindinfer.client.replica_gate import KeyGate, attest_first, gated_context
from blindinfer.client.transport import check_url, pinned_context
from blindinfer.errors import BlindInferError
from blindinfer.protocol.error_shapes import error_document, speaks_openai
from blindinfer.proxy import upstream as wire
from blindinfer.proxy.guard import TOKEN_HEADER, LocalGuard, is_preflight
from blindinfer.proxy.refusal import NotAttested, refusal

if TYPE_CHECKING:
    from blindinfer.proxy.grpc_forward import GrpcListener

log = logging.getLogger("blindinfer.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

STATUS_PATH = "/blindinfer/proxy"
# RFC 9110 7.6.1 plus the legacy ones; also everything named in the Connection header.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the proxy itself, or meaningless across the hop.
DROPPED_REQUEST = frozenset(
    {b"host", b"expect", b"content-length", b"authorization", TOKEN_HEADER.encode()}
)
DROPPED_RESPONSE = frozenset({b"content-length"})
SMALL_RESPONSE = 1 << 16  # read whole, sent in one piece


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    upstream: str
    policy: Policy
    simulation: bool = False
    api_key: str | None = None
    forward_client_authorization: bool = False
    reattest_seconds: float = 300.0
    fresh_seconds: float = 2.0
    retry_seconds: float = 2.0
    timeout: float = 120.0
    max_request_bytes: int = 1 << 30
    max_response_bytes: int = 1 << 30
    max_connections: int = 100
    collateral_url: str | None = None
    allow_insecure_http: bool = False
    """Accept a plain http:// `collateral_url` (refused otherwise)."""
    allow_hosts: tuple[str, ...] = ()
    """Host header values accepted besides the listening address (NAME or NAME:PORT)."""
    allow_origins: tuple[str, ...] = ()
    """Browser origins (scheme://host[:port]) allowed to use the proxy, with CORS."""
    access_token: str | None = None
    """Required in the X-Blindinfer-Proxy-Token header when set."""
    replicas: int = 1
    """Up to this many replicas behind the upstream address, each attested on its own."""
    max_attestation_age: float = DEFAULT_MAX_AGE_SECONDS
    """With replicas > 1: seconds a replica's attestation is trusted for new connections."""
    grpc_listen: tuple[str, int] | None = None
    """Also serve the OIP gRPC service here, plaintext (proxy/grpc_forward.py)."""
    upstream_grpc_port: int | None = None
    """The upstream's gRPC port; by default the `grpc_port` of its `GET /v2`."""

    def __post_init__(self) -> None:
        check_url(self.upstream)
        self.guard()  # ValueError for a malformed host or origin
        if self.access_token is not None and len(self.access_token) < 16:
            raise ValueError("the access token must be at least 16 characters")
        if self.reattest_seconds <= 0 or self.fresh_seconds < 0 or self.retry_seconds < 0:
            raise ValueError("reattest_seconds must be positive, the other intervals >= 0")
        if self.max_request_bytes <= 0 or self.max_response_bytes <= 0:
            raise ValueError("body limits must be positive")
        check_replicas(self.replicas)
        if not self.max_attestation_age > 0:
            raise ValueError("max_attestation_age must be positive")
        if self.grpc_listen is not None and self.replicas > 1:
            raise ValueError(
                "the gRPC listener needs exactly one upstream key (--replicas 1): a gRPC "
                "channel cannot attest a replica's key on the connection that presents it"
            )
        if self.upstream_grpc_port is not None and not 0 < self.upstream_grpc_port < 65536:
            raise ValueError("upstream_grpc_port must be a port from 1 to 65535")

    def guard(self) -> LocalGuard:
        return LocalGuard.build(self.allow_hosts, self.allow_origins, self.access_token)


@dataclass(slots=True)
class ProxyStats:
    """Counters, readable from any thread (for tests and the status endpoint)."""

    attestations: int = 0
    attestation_failures: int = 0
    forwarded: int = 0  # requests actually written to the upstream
    refused: int = 0  # answered by the proxy because attestation failed
    refused_local: int = 0  # refused by the local guard (Host, Origin, token, Content-Type)
    certificate_changes: int = 0
    new_connections: int = 0


class _PinChanged(Exception):
    """A new connection was refused by the pin check; retry on the current client."""


class AttestedUpstream:
    """The attestation state and the pinned connection pool to one upstream."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.url = check_url(config.upstream)
        self.stats = ProxyStats()
        self.attestation: VerifiedAttestation | None = None
        self.failure: NotAttested | None = None
        self._verified_at = float("-inf")  # monotonic time of the last success
        self._failed_at = float("-inf")
        self._client: wire.PinnedPool | None = None
        self._lock = asyncio.Lock()
        self._certificate_listeners: list[Callable[[bytes | None], None]] = []
        parts = urlsplit(self.url)
        self.host = parts.hostname or ""
        self.port = parts.port or 443
        self.host_header = parts.netloc.rpartition("@")[2].encode("ascii")
        self.gate: KeyGate | None = None
        if config.replicas > 1:
            self.gate = replica_set_gate(
                self.url,
                config.policy,
                config.simulation,
                config.collateral_url,
                config.allow_insecure_http,
                replicas=config.replicas,
                max_attestation_age=config.max_attestation_age,
            )

    # -- attestation ---------------------------------------------------------------------

    def _attest_blocking(self) -> VerifiedAttestation:
        if self.gate is not None:  # one replica's key, on a connection of its own
            return attest_first(self.gate, self.config.timeout).attestation
        source = collateral_source(self.config.collateral_url, self.config.allow_insecure_http)
        bundle = capture(self.url, timeout=self.config.timeout, collateral=source)
        return verify_bundle(bundle, policy=self.config.policy, simulation=self.config.simulation)

    async def attest(self, reason: str, *, newer_than: float | None = None) -> None:
        """Attests now (one at a time); with `newer_than`, a success since then suffices."""
        async with self._lock:
            if newer_than is not None and self._verified_at >= newer_than:
                return
            started = time.monotonic()
            try:
                verified = await asyncio.to_thread(self._attest_blocking)
            except (BlindInferError, httpx.HTTPError, OSError, ValueError) as exc:
                failure = refusal(exc, self.url)
                await self._fail(failure, reason)
                raise failure from exc
            self.stats.attestations += 1
            old = self.attestation
            if self.gate is not None:  # one pool for every attested replica
                if self._client is None:
                    await self._replace_client(verified.certificate_der)
            elif old is None or old.certificate_der != verified.certificate_der:
                if old is not None:
                    self.stats.certificate_changes += 1
                await self._replace_client(verified.certificate_der)
            self.attestation = verified
            self.failure = None
            self._verified_at = started
            log.info(
                "attested %s (%s%s, %s, %.1f ms)",
                self.url,
                verified.kind,
                ", SIMULATION: no TEE" if verified.simulation else "",
                reason,
                (time.monotonic() - started) * 1000,
            )

    async def _fail(self, failure: NotAttested, reason: str) -> None:
        self.stats.attestation_failures += 1
        self.attestation = None
        self.failure = failure
        self._failed_at = time.monotonic()
        self._verified_at = float("-inf")
        await self._replace_client(None)
        log.warning("attestation of %s failed (%s): %s", self.url, reason, self.failure)

    def on_certificate(self, listener: Callable[[bytes | None], None]) -> None:
        """`listener(der)` on each newly attested certificate, `listener(None)` on each
        failed attestation (the gRPC side drops its channel pinned to the old one)."""
        self._certificate_listeners.append(listener)

    async def _replace_client(self, certificate_der: bytes | None) -> None:
        for listener in self._certificate_listeners:
            listener(certificate_der)
        old, self._client = self._client, None
        if certificate_der is not None:
            self._client = wire.PinnedPool(
                self.host,
                self.port,
                gated_context() if self.gate else pinned_context(certificate_der),
                self.check_connection,
                timeout=self.config.timeout,
                max_connections=self.config.max_connections,
                max_idle=min(20, self.config.max_connections),
            )
        if old is not None:
            old.aclose()

    async def client(self) -> wire.PinnedPool:
        """The pinned connection pool, attesting first when needed; raises NotAttested."""
        now = time.monotonic()
        if self._client is not None and now - self._verified_at <= self.config.reattest_seconds:
            return self._client
        if self.failure is not None and now - self._failed_at < self.config.retry_seconds:
            raise self.failure
        await self.attest("expired" if self.failure is None else "retry", newer_than=now)
        if self._client is None:  # pragma: no cover - attest() raises instead
            raise refusal(RuntimeError("no attested upstream"), self.url)
        return self._client

    async def periodic(self) -> None:
        """Re-attests every `reattest_seconds` (failures are recorded, not raised)."""
        while True:
            last = self._verified_at if self.failure is None else self._failed_at
            wait = last + self.config.reattest_seconds - time.monotonic()
            await asyncio.sleep(max(wait, 0.05))
            if time.monotonic() - self._verified_at >= self.config.reattest_seconds * 0.99:
                with contextlib.suppress(NotAttested):
                    await self.attest("periodic")

    async def check_connection(
        self, presented: bytes | None, connection: wire.Connection | None = None
    ) -> None:
        """Every new pinned connection, after its handshake and before any request byte:
        it must present the attested certificate, and be covered by a recent attestation
        (a reconnect attests again first when the last one is older than `fresh_seconds`).
        With replicas: its key must be attested, on `connection` when it is not yet.
        Raises _PinChanged (or NotAttested); the pool then closes the connection."""
        self.stats.new_connections += 1
        if self.gate is not None:
            await self._check_replica(presented, connection)
            return
        attestation = self.attestation
        if attestation is None or presented != attestation.certificate_der:
            raise _PinChanged("the new connection presented another certificate")
        handshake = time.monotonic()
        if handshake - self._verified_at > self.config.fresh_seconds:
            await self.attest("reconnect", newer_than=handshake - self.config.fresh_seconds)
            current = self.attestation
            if current is None or current.certificate_der != presented:
                raise _PinChanged("the upstream's attested key changed")

    async def _check_replica(
        self, presented: bytes | None, connection: wire.Connection | None
    ) -> None:
        assert self.gate is not None
        if presented is None or connection is None:
            raise _PinChanged("the new connection presented no certificate")
        timeout = self.config.timeout

        async def send(data: bytes) -> None:
            await connection.write(data, timeout)

        async def receive() -> bytes:
            return await connection.receive_raw(timeout)

        try:
            await self.gate.acheck(presented, send, receive)
        except BlindInferError as exc:  # evidence refused: 502, nothing forwarded
            raise refusal(exc, self.url) from exc
        except wire.UpstreamError as exc:  # gone during the check: nothing was sent
            raise ConnectionResetError(str(exc)) from exc

    async def aclose(self) -> None:
        await self._replace_client(None)

    def status(self) -> dict[str, object]:
        attestation = self.attestation
        return {
            "upstream": self.url,
            "attested": attestation is not None,
            "attestation": None if attestation is None else attestation.to_dict(),
            "age_seconds": None
            if attestation is None
            else round(time.monotonic() - self._verified_at, 3),
            "failure": None if self.failure is None else self.failure.document,
            "attested_keys": 1 if self.gate is None else len(self.gate.keys),
            "stats": dataclasses.asdict(self.stats),
        }


class _BodyTooLarge(Exception):
    pass


class _ResponseCut(Exception):
    """The upstream's answer failed after its head was relayed: the local connection is
    cut (raised out of the app as ConnectionAbortedError; uvicorn closes it)."""


class _LocalGone(Exception):
    """The local client disconnected while its request body was being read."""


async def _local_body(receive: Receive, total: int, limit: int) -> tuple[bytes, bool, int]:
    """The local request body's next part: (bytes, more to come, total so far), bounded."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _LocalGone
    chunk: bytes = message.get("body", b"")
    total += len(chunk)
    if total > limit:
        raise _BodyTooLarge
    return chunk, bool(message.get("more_body", False)), total


def _json_response(status: int, document: dict[str, object]) -> tuple[int, bytes, list[Any]]:
    body = json.dumps(document).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"2"))
    return status, body, headers


def _error(path: str, status: int, document: dict[str, object]) -> tuple[int, bytes, list[Any]]:
    """The proxy's own error answer, in the shape of the API `path` belongs to: OpenAI's
    `{"error": {message, type, param, code, ...}}` on /v1 (what its SDK parses), the Open
    Inference Protocol's `{"error", "code", ...}` elsewhere. Extra fields (the attestation
    error's class, the upstream) are kept in either shape."""
    if speaks_openai(path):
        shaped = error_document(path, status, str(document["code"]), str(document["error"]))
        shaped["error"].update({k: v for k, v in document.items() if k not in ("error", "code")})
        document = shaped
    return _json_response(status, document)


class AttestingProxy:
    """The ASGI app. `upstream` holds the state; lifespan attests and re-attests."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.upstream = AttestedUpstream(config)
        self.guard = config.guard()
        self._periodic: asyncio.Task[None] | None = None
        self.grpc: GrpcListener | None = None
        """The gRPC side, once started (with `config.grpc_listen`); `.port` is its port."""
        self.startup_error: OSError | None = None
        self._api_key = (
            None if not config.api_key else (b"authorization", f"Bearer {config.api_key}".encode())
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websockets: not part of the protocol; uvicorn closes them when we return

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                with contextlib.suppress(NotAttested):  # recorded; requests get the reason
                    await self.upstream.attest("startup")
                try:
                    await self._start_grpc()
                except OSError as exc:
                    self.startup_error = exc
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self._periodic = asyncio.create_task(self.upstream.periodic())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.grpc is not None:
                    await self.grpc.stop()
                if self._periodic is not None:
                    self._periodic.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._periodic
                await self.upstream.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start_grpc(self) -> None:
        if self.config.grpc_listen is None:
            return
        from blindinfer.proxy.grpc_forward import GrpcListener  # grpc only when asked

        listener = GrpcListener(self.config, self.upstream)
        await listener.start()
        self.grpc = listener

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        refused = self.guard.check(scope)
        if refused is not None:
            self.upstream.stats.refused_local += 1
            await _send(send, *_json_response(refused.status, refused.document(path)))
            return
        cors = self.guard.cors_headers(scope)
        if cors:  # an allowed origin: CORS headers on every answer
            if is_preflight(scope):
                headers = [*self.guard.preflight_headers(scope), (b"content-length", b"0")]
                await _send(send, 204, b"", headers)
                return
            send = _adding_headers(send, cors)
        if path == STATUS_PATH:
            await _send(send, *_json_response(200, self.upstream.status()))
            return
        headers, length, error = self._request_headers(scope)
        if error is not None:
            await _send(send, *_error(path, *error))
            return
        raw_path: bytes = scope.get("raw_path") or path.encode("utf-8", "surrogateescape")
        if scope.get("query_string"):
            raw_path += b"?" + scope["query_string"]
        chunked = length is None and any(k == b"transfer-encoding" for k, _ in scope["headers"])
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        elif chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        try:  # h11 checks the method, the target and every header before anything is sent
            if not raw_path.startswith(b"/"):
                raise h11.LocalProtocolError("only origin-form request targets")
            request = h11.Request(method=scope["method"], target=raw_path, headers=headers)
        except h11.LocalProtocolError as exc:
            await _send(send, *_error(path, 400, {"error": str(exc), "code": "invalid_request"}))
            return
        has_body = length is not None or chunked
        try:
            await self._forward(request, has_body, receive, send, path)
        except _ResponseCut as exc:
            raise ConnectionAbortedError(*exc.args) from exc.__cause__
        except NotAttested as exc:
            self.upstream.stats.refused += 1
            await _send(send, *_error(path, exc.status, exc.document))
        except _BodyTooLarge:
            await _send(send, *_error(path, *_too_large(self.config.max_request_bytes)))
        except _LocalGone:
            return
        except (wire.UpstreamError, OSError) as exc:
            await _send(send, *_error(path, *_upstream_error(exc, self.upstream.url)))

    def _request_headers(
        self, scope: Scope
    ) -> tuple[list[tuple[bytes, bytes]], int | None, tuple[int, dict[str, object]] | None]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        named = {
            token.strip().lower()
            for name, value in raw
            if name == b"connection"
            for token in value.split(b",")
        }
        headers: list[tuple[bytes, bytes]] = [(b"host", self.upstream.host_header)]
        length: int | None = None
        client_authorization: bytes | None = None
        for name, value in raw:
            if name == b"content-length":
                if (
                    not value.isdigit()
                    or len(value) > 19
                    or (length is not None and int(value) != length)
                ):
                    return (
                        [],
                        None,
                        (400, {"error": "invalid Content-Length", "code": "invalid_request"}),
                    )
                length = int(value)
            elif name == b"authorization":
                client_authorization = value
            if name in HOP_BY_HOP or name in named or name in DROPPED_REQUEST:
                continue
            headers.append((name, value))
        if length is not None and length > self.config.max_request_bytes:
            return [], None, _too_large(self.config.max_request_bytes)
        if self.config.forward_client_authorization and client_authorization is not None:
            headers.append((b"authorization", client_authorization))
        elif self._api_key is not None:
            headers.append(self._api_key)
        return headers, length, None

    async def _forward(
        self, request: h11.Request, has_body: bool, receive: Receive, send: Send, path: str
    ) -> None:
        """Sends `request` on a pinned connection and relays the answer to `send`.

        A connection that cannot be made, or whose certificate is refused, is retried once
        after attesting again (nothing was written on it). A reused connection the server
        closed before any response byte is retried once on a new connection, and only if
        the whole body was already in hand (nothing is lost by sending it again)."""
        timeout = self.config.timeout
        limit = self.config.max_request_bytes
        pool = await self.upstream.client()
        body, complete, total = b"", True, 0
        if has_body:
            body, more, total = await _local_body(receive, 0, limit)
            complete = not more
        retried = resent = False
        while True:
            try:
                connection = await pool.acquire(fresh=retried)
            except (_PinChanged, OSError) as exc:
                if retried:
                    raise refusal(exc, self.upstream.url) from exc
                retried = True
                await self.upstream.attest("reconnect failed", newer_than=time.monotonic())
                pool = await self.upstream.client()
                continue
            try:
                await wire.send_head(connection, request, body, complete, timeout)
                resent = complete  # the whole body left in that write: it can go again
                while not complete and not connection.answered:  # stops if answered early
                    chunk, more, total = await _local_body(receive, total, limit)
                    await wire.send_body(connection, chunk, timeout)
                    if not more:
                        await wire.end_body(connection, timeout)
                        complete = True
                response = await wire.read_head(connection, timeout)
            except wire.StaleConnection:
                pool.release(connection, reusable=False)
                if retried or not resent:
                    raise
                retried = True
                continue
            except BaseException:
                pool.release(connection, reusable=False)
                raise
            break
        self.upstream.stats.forwarded += 1
        reusable = False
        try:
            await self._relay(connection, response, send, path)
            reusable = True
        finally:
            pool.release(connection, reusable=reusable)

    async def _relay(
        self, connection: wire.Connection, response: h11.Response, send: Send, path: str
    ) -> None:
        limit = self.config.max_response_bytes
        timeout = self.config.timeout
        named = {
            token.strip()
            for name, value in response.headers
            if name == b"connection"
            for token in value.lower().split(b",")
        }
        declared: int | None = None
        headers: list[tuple[bytes, bytes]] = []
        for name, value in response.headers:  # h11: names lower-case, Content-Length valid
            if name == b"content-length":
                declared = int(value)
            elif name in HOP_BY_HOP or name in named or name.startswith(b"access-control-"):
                continue  # CORS headers are the guard's alone: never the upstream's
            else:
                headers.append((name, value))
        if declared is not None:
            if declared > limit:
                await _send(send, *_error(path, *_response_too_large(limit)))
                return
            headers.append((b"content-length", str(declared).encode()))
        start = {"type": "http.response.start", "status": response.status_code, "headers": headers}
        if declared is not None and declared <= SMALL_RESPONSE:
            parts = []
            while (chunk := await wire.read_body(connection, limit, timeout)) is not None:
                parts.append(chunk)
            await send(start)
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": False})
            return
        await send(start)
        try:
            while (chunk := await wire.read_body(connection, limit, timeout)) is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (wire.UpstreamError, TimeoutError) as exc:
            # the head is out: cutting the local connection is the only signal left
            raise _ResponseCut(str(exc)) from exc
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _adding_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def adding(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return adding


async def _send(send: Send, status: int, body: bytes, headers: list[Any]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _too_large(limit: int) -> tuple[int, dict[str, object]]:
    return (
        413,
        {"error": f"the request body is larger than {limit} bytes", "code": "payload_too_large"},
    )


def _response_too_large(limit: int) -> tuple[int, dict[str, object]]:
    return (
        502,
        {"error": f"the upstream's response is larger than {limit} bytes", "code": "bad_gateway"},
    )


def _upstream_error(exc: BaseException, upstream: str) -> tuple[int, dict[str, object]]:
    return (
        502,
        {
            "error": f"forwarding to {upstream} failed: {type(exc).__name__}: {exc}",
            "code": "upstream_error",
        },
    )


# -- where it listens ----------------------------------------------------------------------


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (loopback)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen takes HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


REMOTE_REFUSAL = (
    "refusing to listen on {host}: the proxy's local side is plain HTTP without "
    "authentication, and it adds its API key to whatever it forwards. On a non-loopback "
    "address anyone who can reach it would use the upstream under your key, and your "
    "tensors would cross the network unencrypted before reaching the attested channel. "
    "Pass --allow-remote only on a network you control end to end."
)
GRPC_REMOTE_REFUSAL = (
    "refusing to listen for gRPC on {host}: the proxy's gRPC side is plaintext, and it adds "
    "its API key to whatever it forwards. On a non-loopback address anyone who can reach "
    "it would use the upstream under your key, and your tensors would cross the network "
    "unencrypted. Pass --allow-remote only on a network you control end to end."
)


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it; without it a response whose headers and body are
    # written separately waits for a delayed ACK (+40 ms per request).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    # Listening now (uvicorn only raises the backlog later): two SO_REUSEADDR sockets that
    # are bound but not yet listening may share a port, so the gRPC listener, bound during
    # startup, would otherwise land on this very port without an error.
    sock.listen(2048)
    return sock


def unix_listening_socket(path: str) -> socket.socket:
    """A Unix socket at `path` that only this user can connect to (mode 0600, created so:
    there is no moment at which it is more open). A stale socket file left by a proxy that
    died is replaced; a live one, or anything that is not a socket, is an error."""
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_socket()):
        raise ValueError(f"{path} exists and is not a socket; refusing to replace it")
    if target.exists():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError:
            target.unlink()  # nobody listens: left by a proxy that died
        else:
            raise ValueError(f"{path}: another process is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def _uvicorn_server(app: AttestingProxy) -> Any:
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from blindinfer.asgi.coalesce import coalesce_writes

    config = uvicorn.Config(
        app,
        http=coalesce_writes(AutoHTTPProtocol),  # head and body in one write (asgi/coalesce.py)
        log_level="warning",
        access_log=False,  # paths carry model names
        proxy_headers=False,  # nothing here reads the client's address; one layer less
        server_header=False,
        date_header=False,
        lifespan="on",
        timeout_keep_alive=30,
    )
    return uvicorn.Server(config)


def serve_proxy(
    config: ProxyConfig,
    host: str,
    port: int,
    on_ready: Callable[[AttestingProxy, int], None] | None = None,
    unix_socket: str | None = None,
) -> None:
    """Serves in this thread until interrupted; `on_ready(app, port)` once it listens
    (port 0 on `unix_socket`, which replaces host and port when given)."""
    app = AttestingProxy(config)
    server = _uvicorn_server(app)
    sock = unix_listening_socket(unix_socket) if unix_socket else listening_socket(host, port)
    bound = 0 if unix_socket else int(sock.getsockname()[1])
    if on_ready is not None:

        def notify() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.01)
            if server.started:
                on_ready(app, bound)

        threading.Thread(target=notify, daemon=True).start()
    # uvicorn re-raises SIGTERM after its graceful shutdown; with the default handler the
    # process would die there, before the socket file is removed below.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        _run_server(app, server, sock)
    finally:
        sock.close()
        if unix_socket:
            with contextlib.suppress(OSError):
                os.unlink(unix_socket)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_server(app: AttestingProxy, server: Any, sock: socket.socket) -> None:
    """uvicorn exits (SystemExit 3) when the app's startup fails: raise why instead."""
    try:
        server.run(sockets=[sock])
    except SystemExit:
        if app.startup_error is None:
            raise
    if app.startup_error is not None:
        raise app.startup_error


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


class RunningProxy:
    """A proxy served from a background thread (tests, benchmarks, embedding)."""

    def __init__(
        self,
        config: ProxyConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_socket: str | None = None,
    ) -> None:
        self.app = AttestingProxy(config)
        self._server = _uvicorn_server(self.app)
        self.unix_socket = unix_socket
        if unix_socket:  # clients: httpx.HTTPTransport(uds=unix_socket), any host in the URL
            self._sock = unix_listening_socket(unix_socket)
            self.port = 0
            self.url = "http://localhost"
        else:
            self._sock = listening_socket(host, port)
            self.port = int(self._sock.getsockname()[1])
            shown = f"[{host}]" if ":" in host else host
            self.url = f"http://{shown}:{self.port}"
        self._thread = threading.Thread(
            target=self._run,
            name=f"blindinfer-proxy-{secrets.token_hex(2)}",
            daemon=True,
        )

    @property
    def upstream(self) -> AttestedUpstream:
        return self.app.upstream

    @property
    def grpc_port(self) -> int:
        """The gRPC listener's port (after start, with `config.grpc_listen`)."""
        if self.app.grpc is None:
            raise RuntimeError("this proxy has no gRPC listener")
        return self.app.grpc.port

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # a failed startup: start() raises it
            _run_server(self.app, self._server, self._sock)

    def start(self, timeout: float = 30.0) -> RunningProxy:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                if self.app.startup_error is not None:
                    raise self.app.startup_error
                raise RuntimeError("the proxy did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()
        if self.unix_socket:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_socket)

    def __enter__(self) -> RunningProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = [
    "AttestedUpstream",
    "AttestingProxy",
    "NotAttested",
    "ProxyConfig",
    "ProxyStats",
    "RunningProxy",
    "is_loopback",
    "parse_listen",
    "serve_proxy",
    "unix_listening_socket",
]
