"""`connect(..., transport="grpc")`: inference over the server's OIP v2 gRPC port, on a
channel that trusts exactly the attested certificate.

Why it is safe: the channel is made only after `connect` verified the evidence over HTTPS
(fresh nonce, policy, key binding: the same code as the default transport). Its TLS
credentials hold that one certificate as the only root, and the name checked is one the
certificate itself carries (`grpc.ssl_target_name_override`), so the handshake succeeds only
against a peer that holds the attested key: a certificate that key did not sign fails with
CERTIFICATE_VERIFY_FAILED before a byte of any call is sent (`KeyBindingError`). The gRPC
port (the `grpc_port=` argument, or what the attested server announces in `GET /v2`) is no
security input: whoever listens there must present the attested key. The channel is TLS
only (`grpc.secure_channel`); the API key travels as `authorization: Bearer` metadata on it.

The channel is grpc's sync one, thread-safe; the AsyncClient runs its calls in a worker
thread (`asyncio.to_thread`), which keeps one implementation of the transport.

grpcio (and protobuf) are optional for the client: the `grpc` extra. They are imported only
here, and only for `transport="grpc"`; without them `connect` says what to install.

Refusals raise what the HTTPS transport raises (`client/grpc_errors.py`), and are retried by
the same `RetryPolicy` (429/503 with the server's `retry-after`); a call that could not be
sent because the connection failed is sent again at most `BROKEN_RETRIES` times, as on HTTPS
(inference and metadata are idempotent), never after a refused certificate or a timeout.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

from blindinfer.client.common import BROKEN_RETRIES
from blindinfer.client.grpc_errors import RETRY_AFTER_KEY, metadata_value, rpc_error
from blindinfer.client.grpc_pin import (
    certificate_name,
    certificate_pem,
    grpc_target,
)
from blindinfer.client.models import ModelMetadata
from blindinfer.client.retry import RetryPolicy
from blindinfer.errors import (
    BlindInferError,
    ConnectionFailedError,
    ServerError,
    UsageError,
)
from blindinfer.protocol.limits import TensorLimits

log = logging.getLogger("blindinfer.client")

TRANSPORTS: Final = ("https", "grpc")
INSTALL_HINT: Final = (
    "transport='grpc' needs grpcio and protobuf, which are optional: pip install 'blindinfer[grpc]'"
)
_BROKEN_BACKOFF = 0.05


def check_transport(transport: object) -> str:
    """`transport` if it is one the client speaks; UsageError (a ValueError) otherwise."""
    if not isinstance(transport, str) or transport not in TRANSPORTS:
        raise UsageError(
            f"unknown transport {transport!r}: use 'https' (the default) or 'grpc' "
            "(attests over HTTPS, then runs models over the server's gRPC port)"
        )
    return transport


def check_grpc_port(port: object) -> int | None:
    """`grpc_port=` as given: None (ask the server) or a port number; UsageError otherwise."""
    if port is None:
        return None
    if type(port) is not int or not 1 <= port <= 65535:
        raise UsageError(f"grpc_port must be a port number from 1 to 65535, got {port!r}")
    return port


def check_options(transport: object, grpc_port: object, replicas: int) -> None:
    """`connect()`'s transport arguments, checked before anything is sent: UsageError for
    an unknown transport, a bad port, a port without gRPC, gRPC without grpcio or with
    replicas > 1 (a replica set attests each connection's key on that connection)."""
    check_transport(transport)
    if check_grpc_port(grpc_port) is not None and transport != "grpc":
        raise UsageError("grpc_port= is for transport='grpc' only")
    if transport == "grpc":
        load_grpc()
        if replicas > 1:
            raise UsageError(
                "transport='grpc' pins one attested key: it cannot be combined with "
                "replicas > 1 (use transport='https' for a replica set)"
            )


def load_grpc() -> Any:
    """The `grpc` module, or a UsageError saying how to install it."""
    try:
        import grpc

        from blindinfer.protocol.oip_grpc import oip_v2_pb2  # noqa: F401 - needs protobuf
    except ImportError as exc:
        raise UsageError(INSTALL_HINT) from exc
    return grpc


class GrpcTransport:
    """One TLS channel, pinned to the attested certificate, and its two calls.

    Thread-safe: a grpc channel serves concurrent calls over one HTTP/2 connection.
    """

    def __init__(
        self,
        target: str,
        certificate_der: bytes,
        *,
        api_key: str | None,
        timeout: float,
        retry: RetryPolicy,
        limits: TensorLimits,
    ) -> None:
        grpc = load_grpc()
        from blindinfer.client import grpc_tensors
        from blindinfer.protocol.oip_grpc import service

        self._grpc = grpc
        self._tensors = grpc_tensors
        self.target = target
        self._timeout = timeout
        self._retry = retry
        self._limits = limits
        self._metadata: tuple[tuple[str, str], ...] = ()
        if api_key:
            if not (api_key.isascii() and api_key.isprintable()):
                raise UsageError("api_key must be printable ASCII to travel as gRPC metadata")
            self._metadata = (("authorization", f"Bearer {api_key}"),)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=certificate_pem(certificate_der)
        )
        self._channel = grpc.secure_channel(
            target,
            credentials,
            options=[
                ("grpc.ssl_target_name_override", certificate_name(certificate_der)),
                # as the HTTPS fast path's max_body: the REST parser's bounds, then a margin
                ("grpc.max_receive_message_length", _receive_limit(limits)),
                ("grpc.max_send_message_length", -1),
            ],
        )
        self._infer = self._method(service.MODEL_INFER)
        self._metadata_call = self._method(service.MODEL_METADATA)
        self._live = self._method(service.SERVER_LIVE)

    def _method(self, method: Any) -> Callable[..., Any]:
        return self._channel.unary_unary(  # type: ignore[no-any-return]
            method.path,
            request_serializer=method.request.SerializeToString,
            response_deserializer=method.response.FromString,
        )

    def probe(self) -> None:
        """Makes the pinned handshake now (ServerLive: no key, no data), so that a port
        that presents another certificate fails `connect()` itself (KeyBindingError)."""
        from blindinfer.protocol.oip_grpc import oip_v2_pb2 as pb

        self._call(self._live, pb.ServerLiveRequest(), metadata=())

    def infer(
        self, model: str, arrays: dict[str, Any], outputs: Any, receipt: bool = False
    ) -> tuple[dict[str, Any], object]:
        """The outputs by name and, with `receipt`, the (unverified) receipt the answer
        carries: the caller checks it (`Client._check_receipt`)."""
        request = self._tensors.infer_request(model, arrays, outputs, receipt)
        response = self._call(self._infer, request)
        results = self._tensors.infer_outputs(response, self._limits)
        return results, self._tensors.receipt_of(response) if receipt else None

    def model_metadata(self, model: str) -> ModelMetadata:
        from blindinfer.protocol.oip_grpc import oip_v2_pb2 as pb

        response = self._call(self._metadata_call, pb.ModelMetadataRequest(name=model))
        return self._tensors.model_metadata(response, self._limits)

    def close(self) -> None:
        self._channel.close()

    def _call(
        self,
        call: Callable[..., Any],
        request: Any,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Any:
        """`call(request)`, retried as the module docstring says; failures as blindinfer's.
        `metadata`: instead of the API key's."""
        sent = self._metadata if metadata is None else metadata
        attempt, broken = 1, 0
        while True:
            try:
                return call(request, timeout=self._timeout, metadata=sent)
            except self._grpc.RpcError as exc:
                error, status, retry_after = self._error(exc)
                wait = self._wait(error, status, attempt, broken, retry_after)
                if wait is None:
                    raise error from exc
            if isinstance(error, ServerError):
                attempt += 1
            else:
                broken += 1
            time.sleep(wait)

    def _error(self, exc: Any) -> tuple[BlindInferError, str, str | None]:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        status = getattr(code, "name", None) or "UNKNOWN"
        details = exc.details() if callable(getattr(exc, "details", None)) else None
        metadata = (
            exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else ()
        )
        error = rpc_error(status, details, metadata, target=self.target, timeout=self._timeout)
        return error, status, metadata_value(metadata, RETRY_AFTER_KEY)

    def _wait(
        self,
        error: BlindInferError,
        status: str,
        attempt: int,
        broken: int,
        retry_after: str | None,
    ) -> float | None:
        """Seconds before sending again, or None: raise `error`."""
        if isinstance(error, ServerError):
            wait = self._retry.delay(
                attempt,
                error.status,
                retry_after,
                now=time.time(),
                random=random.random(),  # noqa: S311 - jitter, not a secret
            )
            if wait is not None:
                log.info(
                    "gRPC %s (HTTP %d); retrying in %.2f s (attempt %d of at most %d)",
                    error.code,
                    error.status,
                    wait,
                    attempt + 1,
                    self._retry.max_attempts,
                )
            return wait
        if type(error) is not ConnectionFailedError or broken >= BROKEN_RETRIES:
            return None  # KeyBindingError: no accident
        if status == "DEADLINE_EXCEEDED":
            return None  # the server may be busy with it
        log.info(
            "gRPC call failed (%s); sending it again (%d of %d)", status, broken + 1, BROKEN_RETRIES
        )
        return _BROKEN_BACKOFF * (broken + 1)


def open_channel(
    url: str,
    port: int,
    certificate_der: bytes,
    *,
    api_key: str | None,
    timeout: float,
    retry: RetryPolicy,
    limits: TensorLimits,
) -> GrpcTransport:
    """The pinned channel to `port` on the attested server's host, its handshake made
    (`GrpcTransport.probe`): a port that presents another certificate fails here."""
    channel = GrpcTransport(
        grpc_target(urlsplit(url).hostname or "", port),
        certificate_der,
        api_key=api_key,
        timeout=timeout,
        retry=retry,
        limits=limits,
    )
    try:
        channel.probe()
    except BaseException:
        channel.close()
        raise
    return channel


def _receive_limit(limits: TensorLimits) -> int:
    """Bytes of one answer: the outputs' bound plus room for their descriptions."""
    return min(limits.max_total_bytes + limits.max_header_bytes, 2**31 - 1)
