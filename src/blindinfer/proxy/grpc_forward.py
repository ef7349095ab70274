"""The attesting proxy's gRPC side: `inference.GRPCInferenceService`, forwarded as bytes.

A local plaintext gRPC listener (`ProxyConfig.grpc_listen`) lets an unmodified
`tritonclient.grpc` (or the KServe SDK) reach the upstream's gRPC port through the same
attestation as the HTTP side (proxy/forward.py): it runs on the HTTP side's event loop and
shares its `AttestedUpstream`, so both sides stand or fall with one attestation.

- Only the service's unary methods (`protocol.oip_grpc.service.METHODS`) are forwarded;
  any other method is UNIMPLEMENTED, answered here. Requests and responses stay bytes: the
  proxy parses nothing, grpc bounds each message (`max_request_bytes`,
  `max_response_bytes`, RESOURCE_EXHAUSTED beyond).
- The access token, when the proxy has one, is required in the `x-blindinfer-proxy-token`
  metadata (UNAUTHENTICATED without it, before anything else happens) and never forwarded.
  `authorization` from local callers is dropped unless `forward_client_authorization`;
  the proxy's own API key is added on the upstream call only. No Host/Origin checks: a
  browser cannot speak plaintext HTTP/2 (h2c) to this port, let alone gRPC.
- Upstream, one grpc secure channel whose only trust root is the attested certificate (a
  self-signed leaf: only the holder of the attested key can complete the handshake), with
  the certificate's own DNS name as the TLS target name. Before each call the proxy's
  attestation must be valid (re-attested every `reattest_seconds`, failures retried at most
  once per `retry_seconds`, as on the HTTP side). A failed attestation drops the channel at
  once (the old pin is never used again); a new attested certificate builds a new channel.
- grpc reconnects by itself, so unlike the HTTP side a new connection cannot be checked
  before its first byte; it needs no check: the pin admits only the attested key, which
  lives in the attested TEE's memory only. A restarted server has a new key: its handshake
  fails, the call fails without a request byte sent, the proxy attests again and, if the
  key changed and the new server satisfies the policy, retries the call once on a channel
  pinned to the new key.
- Without a valid attestation nothing is forwarded: UNAVAILABLE when the upstream could not
  be reached, FAILED_PRECONDITION when its evidence or the policy failed; the details name
  the attestation error's class and message, the trailing metadata carries
  `blindinfer-error-code` (`upstream_unavailable`, `attestation_failed`),
  `blindinfer-http-status` (503, 502: the HTTP side's answer) and
  `blindinfer-attestation-error` (the class).
- With `replicas` > 1 there is no gRPC side (ProxyConfig refuses it): a grpc channel cannot
  attest a replica's key on the connection that presents it.

The upstream's gRPC port is `upstream_grpc_port`, or else the `grpc_port` of its REST
`GET /v2`, read over TLS pinned to the attested certificate (not a security input: the key
is pinned, whatever the port).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio
import httpx

from blindinfer.client.grpc_pin import (
    announced_port,
    certificate_name,
    certificate_pem,
    grpc_target,
)
from blindinfer.client.transport import pinned_context
from blindinfer.errors import BlindInferError
from blindinfer.protocol import strict_json
from blindinfer.protocol.oip_grpc.service import METHODS, SERVICE_NAME
from blindinfer.proxy.guard import TOKEN_HEADER
from blindinfer.proxy.refusal import NotAttested, refusal

if TYPE_CHECKING:
    from blindinfer.proxy.forward import AttestedUpstream, ProxyConfig

log = logging.getLogger("blindinfer.proxy.grpc")

ALLOWED_METHODS: frozenset[str] = frozenset(method.path for method in METHODS)
"""The only paths forwarded: the service's unary calls (ServerLive ... RepositoryModelUnload)."""

ERROR_CODE_KEY = "blindinfer-error-code"  # as the server's (server/grpc/status.py)
HTTP_STATUS_KEY = "blindinfer-http-status"  # what the HTTP side answers for the same refusal
ATTESTATION_ERROR_KEY = "blindinfer-attestation-error"
GRPC_MAX_MESSAGE = (1 << 31) - 1  # grpc's message limits are C ints
MAX_SERVER_DOCUMENT = 1 << 16  # GET /v2: a few hundred bytes

# Set by grpc itself on each hop, meaningless across it, or the proxy's own.
_DROPPED_INBOUND = frozenset(
    {"authorization", TOKEN_HEADER, "user-agent", "te", "content-type", "host", "connection"}
)

Metadata = Sequence[tuple[str, str | bytes]]


def is_allowed(path: str) -> bool:
    """Whether `path` (`/package.Service/Method`) is forwarded at all."""
    return path in ALLOWED_METHODS


def _relayable(key: str) -> bool:
    return not key.startswith((":", "grpc-")) and key not in ("content-type", "te")


def upstream_metadata(
    inbound: Metadata, *, forward_authorization: bool, api_key: str | None
) -> list[tuple[str, str | bytes]]:
    """The metadata sent upstream for a local call's `inbound` metadata: transport keys,
    the access token and the caller's `authorization` dropped (kept with
    `forward_authorization`), the proxy's API key added when it has one."""
    kept: list[tuple[str, str | bytes]] = []
    caller_authorization: list[tuple[str, str | bytes]] = []
    for key, value in inbound:
        name = key.lower()
        if name == "authorization":
            caller_authorization.append((name, value))
        elif _relayable(name) and name not in _DROPPED_INBOUND:
            kept.append((name, value))
    if forward_authorization and caller_authorization:
        kept.extend(caller_authorization[:1])
    elif api_key:
        kept.append(("authorization", f"Bearer {api_key}"))
    return kept


def relayed_metadata(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    """The upstream's initial or trailing metadata as passed back to the local caller."""
    return [(key, value) for key, value in metadata or () if _relayable(key.lower())]


def token_matches(inbound: Metadata, token: str | None) -> bool:
    """True without a token; otherwise exactly one `x-blindinfer-proxy-token` equal to it."""
    if token is None:
        return True
    given = [value for key, value in inbound if key.lower() == TOKEN_HEADER]
    if len(given) != 1 or not isinstance(given[0], str):
        return False
    return hmac.compare_digest(given[0].encode(), token.encode())


def refusal_status(refused: NotAttested) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """The status for a call refused because the upstream is not attested: UNAVAILABLE when
    it could not be reached (503 on the HTTP side), FAILED_PRECONDITION when its evidence
    or the policy failed (502)."""
    document = refused.document
    code = str(document.get("code", "attestation_failed"))
    status = (
        grpc.StatusCode.UNAVAILABLE
        if refused.status == 503
        else (grpc.StatusCode.FAILED_PRECONDITION)
    )
    trailing = [(ERROR_CODE_KEY, code), (HTTP_STATUS_KEY, str(refused.status))]
    kind = document.get("attestation_error")
    if isinstance(kind, str) and kind.isascii() and kind.isprintable():
        trailing.append((ATTESTATION_ERROR_KEY, kind))
    return status, f"{code}: {document.get('error')}", trailing


class _Unusable(Exception):
    """The upstream is attested but its gRPC side cannot be used (no port announced)."""

    def __init__(self, status: grpc.StatusCode, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class PinnedChannel:
    """The grpc channel to the upstream's gRPC port, pinned to the current attestation."""

    def __init__(self, config: ProxyConfig, upstream: AttestedUpstream) -> None:
        self.config = config
        self.upstream = upstream
        self._channel: grpc.aio.Channel | None = None
        self._pin: bytes | None = None
        self._ports: dict[bytes, int] = {}
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        upstream.on_certificate(self._certificate_changed)

    @property
    def pin(self) -> bytes | None:
        """The certificate the channel trusts now (None: no channel, none trusted)."""
        return self._pin

    def _certificate_changed(self, certificate_der: bytes | None) -> None:
        """Called by the upstream on a failed attestation (None) or a new attested key:
        the channel pinned to anything else is dropped now, its calls cancelled."""
        if certificate_der != self._pin:
            self._drop()

    def _drop(self) -> None:
        old, self._channel, self._pin = self._channel, None, None
        if old is not None:
            task = asyncio.ensure_future(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def current(self) -> tuple[grpc.aio.Channel, bytes]:
        """The channel and its pin, attesting first when due; raises NotAttested."""
        for _ in range(3):  # an attestation may change while the channel is being built
            await self.upstream.client()
            attestation = self.upstream.attestation
            if attestation is None:  # pragma: no cover - client() raises instead
                break
            pin = attestation.certificate_der
            if self._channel is not None and self._pin == pin:
                return self._channel, pin
            async with self._lock:
                if self._pin != pin:
                    await self._build(pin)
            current = self.upstream.attestation
            if (
                self._channel is not None
                and current is not None
                and self._pin == pin == (current.certificate_der)
            ):
                return self._channel, pin
        changing = ConnectionError("the upstream's attestation kept changing")
        raise refusal(changing, self.upstream.url)

    async def _build(self, pin: bytes) -> None:
        self._drop()
        port = await self._port(pin)
        current = self.upstream.attestation
        if current is None or current.certificate_der != pin:
            return  # attested again (or failed) meanwhile: the caller starts over
        target = grpc_target(self.upstream.host, port)
        try:
            name = certificate_name(pin)
        except BlindInferError as exc:
            raise _Unusable(
                grpc.StatusCode.FAILED_PRECONDITION, "upstream_no_grpc", str(exc)
            ) from exc
        credentials = grpc.ssl_channel_credentials(root_certificates=certificate_pem(pin))
        options: list[tuple[str, Any]] = [
            ("grpc.ssl_target_name_override", name),
            ("grpc.use_local_subchannel_pool", 1),  # never share a connection across pins
            ("grpc.max_send_message_length", min(self.config.max_request_bytes, GRPC_MAX_MESSAGE)),
            (
                "grpc.max_receive_message_length",
                min(self.config.max_response_bytes, GRPC_MAX_MESSAGE),
            ),
            ("grpc.primary_user_agent", "blindinfer-proxy"),
        ]
        self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._pin = pin
        log.info("gRPC channel to %s pinned to the attested key", target)

    async def _port(self, pin: bytes) -> int:
        if self.config.upstream_grpc_port is not None:
            return self.config.upstream_grpc_port
        known = self._ports.get(pin)
        if known is not None:
            return known
        headers = {"accept": "application/json"}
        if self.config.api_key:
            headers["authorization"] = f"Bearer {self.config.api_key}"
        try:
            async with (
                httpx.AsyncClient(
                    verify=pinned_context(pin), timeout=min(self.config.timeout, 30.0)
                ) as http,
                http.stream("GET", self.upstream.url + "/v2", headers=headers) as response,
            ):
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_SERVER_DOCUMENT:
                        raise ValueError("the upstream's GET /v2 answer is too large")
                if response.status_code != 200:
                    status = response.status_code
                    raise ValueError(f"the upstream answered HTTP {status} to GET /v2")
            port = announced_port(strict_json.loads(bytes(body)))
        except httpx.HTTPError as exc:
            raise _Unusable(
                grpc.StatusCode.UNAVAILABLE,
                "upstream_unavailable",
                f"reading the upstream's gRPC port failed: {type(exc).__name__}",
            ) from exc
        except (ValueError, BlindInferError) as exc:
            raise _Unusable(
                grpc.StatusCode.FAILED_PRECONDITION,
                "upstream_no_grpc",
                f"{exc} (or give the proxy --upstream-grpc-port)",
            ) from exc
        self._ports = {pin: port}
        return port

    async def aclose(self) -> None:
        self._drop()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _transport_failure(error: grpc.aio.AioRpcError) -> bool:
    """A call that failed in grpc's transport (no connection, handshake refused by the pin,
    connection lost) rather than an answer of the upstream, which always names its code."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return not any(key == ERROR_CODE_KEY for key, _ in error.trailing_metadata() or ())


async def _abort(
    context: grpc.aio.ServicerContext[bytes, bytes],
    status: grpc.StatusCode,
    details: str,
    trailing: Metadata,
) -> NoReturn:
    await context.abort(status, details, trailing_metadata=tuple(trailing))
    raise AssertionError("unreachable")  # pragma: no cover - abort() raises


class GrpcForwarder(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The generic handler: allowed paths get a forwarding behaviour, others None
    (grpc answers UNIMPLEMENTED)."""

    def __init__(self, config: ProxyConfig, upstream: AttestedUpstream) -> None:
        self.config = config
        self.upstream = upstream
        self.channel = PinnedChannel(config, upstream)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for path in sorted(ALLOWED_METHODS):
            behaviour: Callable[..., Awaitable[bytes]] = functools.partial(self.forward, path)
            self._handlers[path] = grpc.unary_unary_rpc_method_handler(behaviour)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        return self._handlers.get(path) if isinstance(path, str) else None

    async def forward(
        self, path: str, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        stats = self.upstream.stats
        inbound = tuple(context.invocation_metadata() or ())
        if not token_matches(inbound, self.config.access_token):
            stats.refused_local += 1
            await _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"proxy_token_required: this proxy requires its access token in the "
                f"{TOKEN_HEADER} metadata",
                [(ERROR_CODE_KEY, "proxy_token_required")],
            )
        metadata = upstream_metadata(
            inbound,
            forward_authorization=self.config.forward_client_authorization,
            api_key=self.config.api_key,
        )
        retried = False
        while True:
            started = time.monotonic()
            try:
                channel, pin = await self.channel.current()
            except NotAttested as refused:
                stats.refused += 1
                await _abort(context, *refusal_status(refused))
            except _Unusable as unusable:
                stats.refused += 1
                await _abort(
                    context,
                    unusable.status,
                    f"{unusable.code}: {unusable}",
                    [(ERROR_CODE_KEY, unusable.code)],
                )
            call = channel.unary_unary(path)(
                request, metadata=tuple(metadata), timeout=self._timeout(context)
            )
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as error:
                failure = self.upstream.failure
                if failure is not None and self.channel.pin != pin:
                    # the attestation failed during the call and its channel was closed
                    stats.refused += 1
                    await _abort(context, *refusal_status(failure))
                if _transport_failure(error) and not retried:
                    retried = True
                    try:  # a restarted server has a new key: attest it before a retry
                        await self.upstream.attest("gRPC call failed", newer_than=started)
                    except NotAttested as refused:
                        stats.refused += 1
                        await _abort(context, *refusal_status(refused))
                    current = self.upstream.attestation
                    if current is not None and current.certificate_der != pin:
                        continue  # nothing was sent on the old pin's failed handshake
                if not _transport_failure(error):
                    stats.forwarded += 1
                await _abort(
                    context,
                    error.code(),
                    error.details() or "",
                    relayed_metadata(error.trailing_metadata()),
                )
            stats.forwarded += 1
            initial = relayed_metadata(await call.initial_metadata())
            if initial:
                await context.send_initial_metadata(tuple(initial))
            trailing = relayed_metadata(await call.trailing_metadata())
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            return response

    def _timeout(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> float:
        remaining: float | None = context.time_remaining()
        if remaining is None:
            return self.config.timeout
        return max(min(self.config.timeout, remaining), 0.001)


class GrpcListenError(OSError):
    """The gRPC address cannot be bound (in use, the HTTP side's own, not this machine's)."""


class GrpcListener:
    """The local plaintext gRPC server, on the running event loop (the HTTP side's)."""

    def __init__(self, config: ProxyConfig, upstream: AttestedUpstream) -> None:
        if config.grpc_listen is None:
            raise ValueError("no grpc_listen address")
        self.config = config
        self.host, self.requested_port = config.grpc_listen
        self.forwarder = GrpcForwarder(config, upstream)
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Binds and starts; the bound port (OSError when the address cannot be bound)."""
        server = grpc.aio.server(
            handlers=[self.forwarder],
            options=[
                ("grpc.so_reuseport", 0),  # a port in use is an error, not shared
                (
                    "grpc.max_receive_message_length",
                    min(self.config.max_request_bytes, GRPC_MAX_MESSAGE),
                ),
                (
                    "grpc.max_send_message_length",
                    min(self.config.max_response_bytes, GRPC_MAX_MESSAGE),
                ),
            ],
            maximum_concurrent_rpcs=self.config.max_connections,
        )
        address = f"[{self.host}]" if ":" in self.host else self.host
        try:
            port: int = server.add_insecure_port(f"{address}:{self.requested_port}")
        except RuntimeError as exc:
            raise GrpcListenError(self._refusal(address)) from exc
        if port == 0:
            raise GrpcListenError(self._refusal(address))
        await server.start()
        self._server = server
        self.port = port
        return port

    def _refusal(self, address: str) -> str:
        return (
            f"cannot listen for gRPC on {address}:{self.requested_port}: the port is in use "
            "(by another program, or by the proxy's own --listen)"
        )

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.forwarder.channel.aclose()


__all__ = [
    "ALLOWED_METHODS",
    "ATTESTATION_ERROR_KEY",
    "ERROR_CODE_KEY",
    "SERVICE_NAME",
    "GrpcForwarder",
    "GrpcListenError",
    "GrpcListener",
    "PinnedChannel",
    "is_allowed",
    "refusal_status",
    "relayed_metadata",
    "token_matches",
    "upstream_metadata",
]
