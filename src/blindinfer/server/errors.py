"""The one place where exceptions become HTTP responses.

Every response body is `{"error": <human message>, "code": <machine code>}` (OIP clients
read "error"), except on the OpenAI-compatible API (`/v1/...`), which answers in OpenAI's
shape with the same status and code (`blindinfer.protocol.error_shapes`: one rule by path,
so middleware refusals such as a 415 reach the `openai` SDK in the shape it reads).
Unexpected exceptions become a generic 500 whose body says nothing about the failure;
only the exception's type name is logged, never its message (it may quote user data) and
never a traceback to the client.

A client that goes away before its request body is complete is no server failure: it is
answered 499 "client_disconnected" (nginx's "client closed request"; nobody receives it,
but /metrics counts it) and logged as one INFO line naming the route template only.

No exception reaches the ASGI server: Starlette's outermost `ServerErrorMiddleware` calls
the handler registered for `Exception` and then *re-raises*, so uvicorn would log the full
traceback (paths, model hashes in local variables' reprs) and close the keep-alive
connection. `AnswerUnexpectedErrors`, installed inside it, answers the structured 500
itself and swallows the exception, after one ERROR line with its type and route only.

Storage: ENOSPC / EDQUOT anywhere in an exception's causes (sealed store, audit log) is
507 "storage_full"; an audit log that cannot record a management operation (which is then
refused, unperformed) is 503 "audit_unavailable".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blindinfer.errors import BlindInferError, ProtocolError
from blindinfer.protocol.error_shapes import error_body
from blindinfer.runtime.errors import (
    InferenceTimeoutError,
    InvalidModelError,
    InvalidTensorError,
    MemoryLimitError,
    OverloadedError,
    ResponseTooLargeError,
    WorkerCrashedError,
)
from blindinfer.server.audit import AuditLogError
from blindinfer.server.auth import AccessError, ForbiddenError
from blindinfer.server.metrics import CLIENT_CLOSED_REQUEST, method_label, route_template
from blindinfer.store.errors import (
    InvalidModelNameError,
    MemoryBudgetError,
    ModelConflictError,
    StoreFullError,
    TenantMemoryQuotaError,
    UnknownModelError,
)
from blindinfer.store.sealed import SealedDataError, StorageFullError, is_disk_full

log = logging.getLogger("blindinfer.server")


class PayloadTooLargeError(BlindInferError):
    """A body larger than the configured limit; refused before it is read in full."""


class MissingHeaderError(BlindInferError):
    """A required header is missing or malformed."""


class ClientDisconnectedError(BlindInferError):
    """The client closed the connection before its request body was complete."""


class UnsupportedMediaTypeError(BlindInferError):
    """The request's Content-Type is not one the route reads (server/content_types.py)."""


class RequestTimeoutError(BlindInferError):
    """The request body did not arrive in time (server/body_guard.py); the connection is
    closed and nothing of the body is kept."""


CLIENT_DISCONNECTED = "client_disconnected"
DISK_FULL_MESSAGE = (
    "the server's storage is full, so nothing was changed; delete a model or ask the "
    "operator for disk space"
)
AUDIT_UNAVAILABLE_MESSAGE = (
    "the audit log cannot record this operation now, so it was not performed; retry later"
)


# exception type -> (HTTP status, machine code); the first matching entry wins.
_TABLE: tuple[tuple[type[BlindInferError], int, str], ...] = (
    (UnknownModelError, 404, "unknown_model"),
    (ModelConflictError, 409, "model_name_conflict"),
    (InvalidModelNameError, 400, "invalid_model_name"),
    (StoreFullError, 507, "store_full"),
    (StorageFullError, 507, "storage_full"),
    (TenantMemoryQuotaError, 403, "quota_exceeded"),  # a tenant's limit, like quotas.py
    (MemoryBudgetError, 507, "memory_budget_exceeded"),
    (PayloadTooLargeError, 413, "payload_too_large"),
    (RequestTimeoutError, 408, "request_timeout"),
    (InvalidModelError, 400, "invalid_model"),
    (MissingHeaderError, 400, "invalid_header"),
    (InferenceTimeoutError, 504, "inference_timeout"),
    (ResponseTooLargeError, 422, "response_too_large"),
    (MemoryLimitError, 422, "memory_limit"),
    (WorkerCrashedError, 422, "model_crashed"),
    (SealedDataError, 500, "sealed_storage_corrupted"),
    (UnsupportedMediaTypeError, 415, "unsupported_media_type"),
)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


def _json(
    request: Request, status: int, code: str, message: str, headers: dict[str, str]
) -> Response:
    """The error in the shape of the API `request` went to (OIP, or OpenAI's on /v1)."""
    return Response(
        error_body(request.scope.get("path", ""), status, code, message),
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
    if is_disk_full(exc):  # before the table: an OSError or a wrapped one, never a 500
        return 507, "storage_full", DISK_FULL_MESSAGE
    if isinstance(exc, AuditLogError):
        return 503, "audit_unavailable", AUDIT_UNAVAILABLE_MESSAGE
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
        log.info("a client disconnected before its request body was complete (%s)", where(request))
        # Nobody reads this; Connection: close spares the server any further reading.
        return _json(request, status, code, message, {"Connection": "close"})
    if status >= 500:
        log.error("request failed with %s (%s)", type(exc).__name__, where(request))
    return _json(request, status, code, message, response_headers(exc))


Handler = Callable[[Request, Exception], Awaitable[Response]]


class AnswerUnexpectedErrors:
    """Pure ASGI middleware: an exception that escapes the app is answered by `handler`
    here and goes no further (module docstring: why not Starlette's `Exception` handler).

    Add it before any other middleware (innermost), so that those see the answer as an
    ordinary response (metrics count a 500, not an exception), and once more after all
    of them (outermost), for what a middleware itself raises. If the response had
    already started, nothing can be answered: one line is logged and the exception is
    swallowed; the server then closes the connection, as it must mid-response.
    """

    def __init__(self, app: ASGIApp, handler: Handler = handle_exception) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception as exc:  # the point: nothing escapes to the server
            request = Request(scope, receive)
            if started:
                log.error(
                    "request failed with %s after its response started (%s)",
                    type(exc).__name__,
                    where(request),
                )
                return
            response = await self.handler(request, exc)
            await response(scope, receive, send)


def where(request: Request) -> str:
    """Method and route template, never the path itself (paths carry model names)."""
    template, _ = route_template(getattr(request.app, "routes", ()), request.scope)
    return f"{method_label(request.scope)} {template}"
