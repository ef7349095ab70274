"""Small helpers every route uses: JSON responses and the shared server state."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from blindinfer.server.state import ServerState

T = TypeVar("T")

OFF_LOOP_BYTES = 256 * 1024
"""Outputs from this size on are encoded on a thread (a thread hop costs more than
encoding smaller ones: 64 Ki JSON numbers take about 10 ms)."""


def json_response(document: object, status: int = 200) -> Response:
    return Response(
        json.dumps(document, separators=(",", ":")), status, media_type="application/json"
    )


def raw_headers(headers: Mapping[str, str], body_length: int) -> list[tuple[bytes, bytes]]:
    """The header list Starlette's `Response(body, headers=headers)` sends, byte for
    byte: names lower-cased, Content-Length added unless given."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if all(name != b"content-length" for name, _ in raw):
        raw.append((b"content-length", str(body_length).encode("latin-1")))
    return raw


class BytesEndpoint:
    """A route endpoint `handler(request) -> (body, headers)` answered 200 as a plain
    ASGI app: what `Route(path, function)` would send with `Response(body,
    headers=headers)`, without the Response object and without Starlette's per-request
    wrapper around a function endpoint (a second Request, closures and a wrapped `send`;
    docs/performance.md, "Server HTTP path", has the cost). What `handler` raises goes
    to the app's exception handlers (ExceptionMiddleware, the same handlers as that
    wrapper's) and is answered the same way."""

    def __init__(self, handler: Callable[[Request], Awaitable[tuple[bytes, Mapping[str, str]]]]):
        self.handler = handler
        self.__name__ = handler.__name__  # the route's name, as for a function endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, headers = await self.handler(Request(scope, receive, send))
        await send_bytes(send, body, headers)


async def send_bytes(send: Send, body: bytes, headers: Mapping[str, str]) -> None:
    """Sends `body` with `headers`, status 200, as `Response.__call__` would."""
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": raw_headers(headers, len(body)),
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.blindinfer
    return state


def tensor_bytes(arrays: Mapping[str, object]) -> int:
    """The bytes of data in `arrays` (what a digest or an encoder reads)."""
    return sum(int(np.asarray(array).nbytes) for array in arrays.values())


async def encode_outputs(
    outputs: Mapping[str, npt.NDArray[Any]], encode: Callable[[], T], extra_bytes: int = 0
) -> T:
    """`encode()`, on a thread when `outputs` are large: encoding millions of numbers as
    JSON takes seconds, and on the event loop it would stall every connection, health
    checks and attestation included. Their size is bounded before they reach the server
    (--max-response-bytes, checked in the worker). `extra_bytes`: other tensor bytes that
    `encode()` reads (a receipt's digest of the inputs), counted in the same budget."""
    if tensor_bytes(outputs) + extra_bytes < OFF_LOOP_BYTES:
        return encode()
    return await run_in_threadpool(encode)
