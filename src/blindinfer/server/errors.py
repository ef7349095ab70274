"""The one place where exceptions become HTTP responses.

Every response body is `{"error": <human message>, "code": <machine code>}` (OIP clients
read "error"). Unexpected exceptions become a generic 500 whose body says nothing about
the failure; only the exception's type name is logged, never its message (it may quote
user data) and never a traceback to the client.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from blindinfer.errors import BlindInferError, ProtocolError
from blindinfer.protocol.inference import encode_error
from blindinfer.runtime.errors import InvalidModelError, InvalidTensorError
from blindinfer.store.errors import (
    InvalidModelNameError,
    ModelConflictError,
    StoreFullError,
    UnknownModelError,
)

log = logging.getLogger("blindinfer.server")


class PayloadTooLargeError(BlindInferError):
    """A body larger than the configured limit; refused before it is read in full."""


class MissingHeaderError(BlindInferError):
    """A required header is missing or malformed."""


# exception type -> (HTTP status, machine code); the first matching entry wins.
_TABLE: tuple[tuple[type[BlindInferError], int, str], ...] = (
    (UnknownModelError, 404, "unknown_model"),
    (ModelConflictError, 409, "model_name_conflict"),
    (InvalidModelNameError, 400, "invalid_model_name"),
    (StoreFullError, 507, "store_full"),
    (PayloadTooLargeError, 413, "payload_too_large"),
    (InvalidModelError, 400, "invalid_model"),
    (MissingHeaderError, 400, "invalid_header"),
)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


def _json(status: int, code: str, message: str) -> Response:
    return Response(encode_error(code, message), status_code=status, media_type="application/json")


def status_and_code(exc: BaseException) -> tuple[int, str, str]:
    if isinstance(exc, ProtocolError | InvalidTensorError):
        return 400, exc.code, exc.message
    for kind, status, code in _TABLE:
        if isinstance(exc, kind):
            return status, code, str(exc)
    if isinstance(exc, HTTPException):
        return exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail)
    return 500, "internal_error", "the server could not process this request"


async def handle_exception(request: Request, exc: Exception) -> Response:
    status, code, message = status_and_code(exc)
    if status >= 500:
        log.error("request failed with %s", type(exc).__name__)
    return _json(status, code, message)
