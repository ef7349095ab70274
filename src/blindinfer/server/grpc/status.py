"""The one place where exceptions become gRPC statuses.

The HTTP status and machine code come from `server.errors.status_and_code`, the REST
mapping, so both APIs answer a failure with the same code; only the HTTP status is
translated here. The code travels twice: at the start of the status details
("unknown_model: ...") and alone in the trailing metadata `blindinfer-error-code`. A
refusal that passes with time also carries `retry-after` (seconds), as REST's header.
Unexpected exceptions are INTERNAL with a generic message; only the exception's type and
the method are logged, never its message (it may quote user data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import grpc

from blindinfer.server.errors import response_headers, status_and_code

log = logging.getLogger("blindinfer.server.grpc")

ERROR_CODE_KEY: Final = "blindinfer-error-code"
RETRY_AFTER_KEY: Final = "retry-after"

# machine codes whose meaning the HTTP status alone does not carry
_BY_CODE: Final = {
    "quota_exceeded": grpc.StatusCode.RESOURCE_EXHAUSTED,  # a tenant's limit (HTTP 403)
    "response_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,  # HTTP 422
    "memory_limit": grpc.StatusCode.RESOURCE_EXHAUSTED,  # HTTP 422
    "model_crashed": grpc.StatusCode.INTERNAL,  # HTTP 422: the model failed, not the caller
    "audit_unavailable": grpc.StatusCode.UNAVAILABLE,
}

_BY_HTTP_STATUS: Final = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # what gRPC itself answers to a large message
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.FAILED_PRECONDITION,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass(frozen=True, slots=True)
class GrpcError:
    """What a failed call answers: status, details text and trailing metadata."""

    status: grpc.StatusCode
    code: str
    details: str
    trailing_metadata: tuple[tuple[str, str], ...]


def grpc_error(exc: BaseException, method: str) -> GrpcError:
    """The answer to `exc`, raised while serving `method` (the method name only)."""
    http_status, code, message = status_and_code(exc)
    status = _BY_CODE.get(code) or _BY_HTTP_STATUS.get(http_status, grpc.StatusCode.INTERNAL)
    if http_status >= 500 and status is not grpc.StatusCode.UNAVAILABLE:
        log.error("gRPC %s failed with %s", method, type(exc).__name__)
    metadata: list[tuple[str, str]] = [(ERROR_CODE_KEY, code)]
    retry_after = response_headers(exc).get("Retry-After")
    if retry_after is not None:
        metadata.append((RETRY_AFTER_KEY, retry_after))
    return GrpcError(status, code, f"{code}: {message}", tuple(metadata))
