"""gRPC failures as the blindinfer errors the HTTPS transport raises for the same failure.

Why: a caller of `run_model` should not have to know which transport carried the request.
The server answers a refused gRPC call with a status code and, in the trailing metadata,
`blindinfer-error-code` (the machine code its REST answer carries in `"code"`); this module
turns that into `ServerError(http_status, code, message)` with the HTTP status the REST API
documents for that code (docs/protocol.md, "Error codes"), so both transports raise equal
errors. A status without that code (grpc's own refusals, a peer that is not blindinfer)
gets the HTTP status nearest to its gRPC status and the code `grpc_<status>`.

Transport failures become what `client/transport.py` makes of them for HTTPS:
`KeyBindingError` when the TLS handshake met a certificate other than the attested one
(nothing was sent), `ConnectionFailedError` for everything else that kept the call from
being answered (refused, reset, not TLS, timed out). grpc tells a refused certificate
only in its status text (BoringSSL's CERTIFICATE_VERIFY_FAILED), so that is what is read;
were the text to change, the same failure would still be a ConnectionFailedError, and
tests/e2e/test_client_grpc_e2e.py would say so.

Everything read here is untrusted (details and metadata come from whoever answered): the
code must look like a code and is ignored otherwise; the message is cut short.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from blindinfer.errors import (
    BlindInferError,
    ConnectionFailedError,
    KeyBindingError,
    ServerError,
)

ERROR_CODE_KEY: Final = "blindinfer-error-code"
"""Trailing metadata: the machine-readable code, as the REST error body's `"code"`."""
RETRY_AFTER_KEY: Final = "retry-after"
"""Trailing metadata, optional: as HTTP's Retry-After (seconds)."""

MAX_MESSAGE: Final = 500
"""Characters of a server's message kept (REST error bodies are bounded the same way)."""
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")

GRPC_HTTP_STATUS: Final[dict[str, int]] = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "FAILED_PRECONDITION": 422,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
"""The HTTP status nearest to a gRPC status (as gRPC's own HTTP mapping and Triton's)."""

CODE_HTTP_STATUS: Final[dict[str, int]] = {
    "unauthorized": 401,
    "forbidden": 403,
    "quota_exceeded": 403,
    "unknown_model": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "model_name_conflict": 409,
    "payload_too_large": 413,
    "too_many_tokens": 413,
    "kv_cache_too_large": 413,
    "unsupported_media_type": 415,
    "memory_limit": 422,
    "model_crashed": 422,
    "response_too_large": 422,
    "rate_limited": 429,
    "too_many_concurrent": 429,
    "token_rate_limited": 429,
    "too_many_generations": 429,
    "kv_cache_busy": 429,
    "client_disconnected": 499,
    "internal_error": 500,
    "sealed_storage_corrupted": 500,
    "overloaded": 503,
    "audit_unavailable": 503,
    "inference_timeout": 504,
    "store_full": 507,
    "storage_full": 507,
    "memory_budget_exceeded": 507,
}
"""The REST API's status for each code that is not a 400 (docs/protocol.md, "Error codes");
any other code the server sends with INVALID_ARGUMENT is a malformed request: 400."""

Metadata = Iterable[tuple[str, str | bytes]]


def metadata_value(metadata: Metadata | None, key: str) -> str | None:
    """The first value of `key` as text, or None (absent, binary or not ASCII)."""
    for name, value in metadata or ():
        if name == key:
            return value if isinstance(value, str) and value.isascii() else None
    return None


def error_code(metadata: Metadata | None) -> str | None:
    """The server's machine code, if it sent one that looks like one."""
    value = metadata_value(metadata, ERROR_CODE_KEY)
    return value if value is not None and _CODE.fullmatch(value) else None


def http_status(status: str, code: str | None, details: str = "") -> int:
    """The HTTP status the REST API answers for this error (see the module docstring).

    grpc's own RESOURCE_EXHAUSTED (no code) is either its concurrent-call limit, a 429 to
    retry, or a message over its size limit: a 413, which sending again cannot cure."""
    if code is not None and code in CODE_HTTP_STATUS:
        return CODE_HTTP_STATUS[code]
    if code is None and status == "RESOURCE_EXHAUSTED" and "larger than max" in details:
        return 413
    return GRPC_HTTP_STATUS.get(status, 500)


def _message(details: str | None) -> str:
    text = (details or "").replace("\r", " ").replace("\n", " ").strip()
    return text[:MAX_MESSAGE] or "no message"


def server_error(status: str, details: str | None, metadata: Metadata | None) -> ServerError:
    """A call the server (or grpc on its behalf) refused, as the REST transport raises it.

    The server's details start with the code ("unknown_model: no such model ..."), which
    the REST body carries apart from the message: it is taken off, so both messages match.
    """
    code = error_code(metadata)
    message = _message(details)
    if code is not None and message.startswith(f"{code}: "):
        message = message[len(code) + 2 :] or "no message"
    return ServerError(
        http_status(status, code, message),
        code if code is not None else f"grpc_{status.lower()}",
        message,
    )


_CERTIFICATE_REFUSED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")
_HANDSHAKE = ("handshake failed", "ssl_error", "tsi_")
_REFUSED = ("connection refused", "failed to connect")


def transport_error(
    status: str, details: str | None, *, target: str, timeout: float
) -> BlindInferError:
    """A call that the server never answered (grpc's own UNAVAILABLE, DEADLINE_EXCEEDED)."""
    text = _message(details)
    lowered = text.lower()
    if status == "DEADLINE_EXCEEDED":
        return ConnectionFailedError(
            f"timed out after {timeout:g} s waiting for the answer of {target} (gRPC) "
            "(is the server up and not overloaded? a larger timeout= waits longer)"
        )
    if any(marker.lower() in lowered for marker in _CERTIFICATE_REFUSED):
        return KeyBindingError(
            f"{target} (gRPC) did not present the attested TLS certificate: whoever answers "
            "is not the server that was attested; nothing was sent (is grpc_port= the gRPC "
            "port of the attested server? connect() again to re-attest)"
        )
    if any(marker in lowered for marker in _HANDSHAKE):
        return ConnectionFailedError(
            f"TLS handshake with {target} (gRPC) failed: {text} (is this the server's gRPC "
            "port, served over TLS?)"
        )
    if "refused" in lowered:
        return ConnectionFailedError(
            f"cannot connect to {target} (gRPC): connection refused (is the server running "
            "with --grpc-port, and on this port?)"
        )
    if any(marker in lowered for marker in _REFUSED):
        return ConnectionFailedError(
            f"cannot connect to {target} (gRPC): {text} (check the address and the network)"
        )
    return ConnectionFailedError(
        f"the connection to {target} (gRPC) broke: {text} (did the server stop or restart? "
        "the request may have reached it)"
    )


def rpc_error(
    status: str,
    details: str | None,
    metadata: Metadata | None,
    *,
    target: str,
    timeout: float,
) -> BlindInferError:
    """The blindinfer error for a failed call (the caller chains grpc's as `__cause__`).

    `status`: the gRPC status code's name ("NOT_FOUND"). A blindinfer code in the trailing
    metadata means the server answered; UNAVAILABLE or DEADLINE_EXCEEDED without one mean
    it did not (a transport failure); any other status is a refusal, by grpc or a peer.
    """
    if error_code(metadata) is None and status in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return transport_error(status, details, target=target, timeout=timeout)
    return server_error(status, details, metadata)
