"""Refuses, with 415 `unsupported_media_type`, a request whose Content-Type its route does
not read, before the route runs and before a byte of the body is read.

Why: a browser sends a cross-origin POST without a CORS preflight only with a
`text/plain`, form or multipart Content-Type; none is a body any route parses, so no such
request reaches a route (see `blindinfer.protocol.content_types` for the table and for why
a request without Content-Type is still accepted). The answer comes from the app's own
exception handler, so it has the app's error format: JSON on the native API (OIP's shape,
OpenAI's on `/v1`: `blindinfer.protocol.error_shapes`), CBOR with `X-Blindinfer-Error-Code`
on the BlindAI Core listeners.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from blindinfer.protocol.content_types import (
    UNSUPPORTED_MEDIA_TYPE,
    content_type_refusal,
    header_values,
    oip_media_types,
)
from blindinfer.protocol.inference import encode_error
from blindinfer.server.errors import UnsupportedMediaTypeError

MediaTypes = Callable[[str], frozenset[str]]


class CheckContentType:
    """ASGI middleware; `allowed(path)` names the media types the route at `path` takes."""

    def __init__(self, app: ASGIApp, allowed: MediaTypes = oip_media_types) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            message = content_type_refusal(
                header_values(scope["headers"]), self.allowed(scope["path"])
            )
            if message is not None:
                response = await _refusal(scope, receive, UnsupportedMediaTypeError(message))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _refusal(scope: Scope, receive: Receive, exc: UnsupportedMediaTypeError) -> Response:
    """The app's own answer to `exc` (Starlette puts the app in the scope first)."""
    handlers = getattr(scope.get("app"), "exception_handlers", {})
    for kind in type(exc).__mro__:
        handler = handlers.get(kind)
        if handler is not None:
            response: Response = await handler(Request(scope, receive), exc)
            return response
    return Response(  # pragma: no cover - both apps register a handler
        encode_error(UNSUPPORTED_MEDIA_TYPE, str(exc)),
        status_code=415,
        media_type="application/json",
    )


__all__ = ["CheckContentType"]
