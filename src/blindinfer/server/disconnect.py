"""Stop work for a client that went away before its (non-streamed) answer.

Starlette cancels a streamed response when its client disconnects, but a route that
computes its whole answer before responding never hears of it: a client that asked for 512
tokens and left would keep its worker, its KV cache and its tenant's quotas until the last
token. `until_disconnect(request, work)` runs `work` while it watches the connection: once
the request body has been read, the ASGI server's `receive()` answers only
`http.disconnect`, so a task waiting on it learns of the departure at once, with no polling.
The work is then cancelled (for a generation: its events generator closes, which cancels it
in the worker between two tokens) and `ClientDisconnectedError` is raised (answered 499 to
nobody, counted by /metrics, never logged as a failure).

Call it only after the body has been read in full: the watcher consumes `receive()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from blindinfer.server.errors import ClientDisconnectedError

_T = TypeVar("_T")


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Coroutine[Any, Any, _T]) -> _T:
    """The result of `work`, or ClientDisconnectedError once the client has gone (and
    `work` has been cancelled and has finished unwinding)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # our own cancellation (the server shutting down) or an answer: stop the other
        for pending in (watcher, task):
            if not pending.done():
                pending.cancel()
        for pending in (watcher, task):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({pending})
    if task.cancelled():
        raise ClientDisconnectedError(
            "the client closed the connection before its answer was complete"
        )
    return task.result()
