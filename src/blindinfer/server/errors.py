"""The one place where exceptions become HTTP responses.

Every response body is `{"error": <human message>, "code": <machine code>}` (OIP clients
read "error"). Unexpected exceptions become a generic 500 whose body says nothing about
the failure; only the exception's type name is logged, never its message (it may quote
user data) and never a traceback to the client.

A client that goes away before its request body is complete is no server failure: it is
answered 499 "client_disconnected" (nginx's "client closed request"; nobody receives it,
but /metrics counts it) and logged as one INFO line naming the route template only.
"""

from __future__ import annotations

import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from blindinfer.errors import BlindInferError, ProtocolError
from blindinfer.protocol.inference import encode_error
from blindinfer.runtime.errors import (
    InferenceTimeoutError,
    InvalidModelError,
    InvalidTensorError,
    MemoryLimitError,
    OverloadedError,
    WorkerCrashedError,
)
from blindinfer.server.auth import AccessError, ForbiddenError
from blindinfer.server.metrics import CLIENT_CLOSED_REQUEST, method_label, route_template
from blindinfer.store.errors import (
    InvalidModelNameError,
    MemoryBudgetError,
    ModelConflictError,
    StoreFullError,
    UnknownModelError,
)
from blindinfer.store.sealed import SealedDataError, StorageFullError

log = logging.getLogger("blindinfer.server")


class PayloadTooLargeError(BlindInferError):
    """A body larger than the configured limit; refused before it is read in full."""


class MissingHeaderError(BlindInferError):
    """A required header is missing or malformed."""


class ClientDisconnectedError(BlindInferError):
    """The client closed the connection before its request body was complete."""


CLIENT_DISCONNECTED = "client_disconnected"


# exception type -> (HTTP status, machine code); the first matching entry wins.
_TABLE: tuple[tuple[type[BlindInferError], int, str], ...] = (
    (UnknownModelError, 404, "unknown_model"),
    (ModelConflictError, 409, "model_name_conflict"),
    (InvalidModelNameError, 400, "invalid_model_name"),
    (StoreFullError, 507, "store_full"),
    (StorageFullError, 507, "storage_full"),
    (MemoryBudgetError, 507, "memory_budget_exceeded"),
    (PayloadTooLargeError, 413, "payload_too_large"),
    (InvalidModelError, 400, "invalid_model"),
    (MissingHeaderError, 400, "invalid_header"),
    (InferenceTimeoutError, 504, "inference_timeout"),
    (MemoryLimitError, 422, "memory_limit"),
    (WorkerCrashedError, 422, "model_crashed"),
    (SealedDataError, 500, "sealed_storage_corrupted"),
)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


def _json(status: int, code: str, message: str, headers: dict[str, str]) -> Response:
    return Response(
        encode_error(code, message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def response_headers(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, AccessError):
        return dict(exc.headers)
    if isinstance(exc, OverloadedError):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    if isinstance(exc, HTTPException) and exc.headers:
        return dict(exc.headers)  # e.g. Allow on a 405
    return {}


def status_and_code(exc: BaseException) -> tuple[int, str, str]:
    if isinstance(exc, ClientDisconnect | ClientDisconnectedError):
        return (
            CLIENT_CLOSED_REQUEST,
            CLIENT_DISCONNECTED,
            "the client closed the connection before the request body was complete",
        )
    if isinstance(exc, ProtocolError | InvalidTensorError):
        return 400, exc.code, exc.message
    if isinstance(exc, ForbiddenError) and not exc.visible:
        return 404, "unknown_model", "no such model is visible to this API key"
    if isinstance(exc, AccessError):
        return exc.http_status, exc.code, str(exc)
    if isinstance(exc, OverloadedError):
        return 503, "overloaded", str(exc)
    for kind, status, code in _TABLE:
        if isinstance(exc, kind):
            return status, code, str(exc)
    if isinstance(exc, HTTPException):
        return exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail)
    return 500, "internal_error", "the server could not process this request"


async def handle_exception(request: Request, exc: Exception) -> Response:
    status, code, message = status_and_code(exc)
    if status == CLIENT_CLOSED_REQUEST:
        log.info("a client disconnected before its request body was complete (%s)", _where(request))
        # Nobody reads this; Connection: close spares the server any further reading.
        return _json(status, code, message, {"Connection": "close"})
    if status >= 500:
        log.error("request failed with %s", type(exc).__name__)
    return _json(status, code, message, response_headers(exc))


def _where(request: Request) -> str:
    """Method and route template, never the path itself (paths carry model names)."""
    template, _ = route_template(getattr(request.app, "routes", ()), request.scope)
    return f"{method_label(request.scope)} {template}"
