"""Request bodies: bounded in time, in number and in bytes, and counted against their
tenant before a byte of them is read.

Without this a client could start a body and never finish it: each one held its
buffer (and a chunked upload up to --max-model-bytes) for as long as the client liked,
and the tenant's concurrency slot was taken only once the body was in. `BodyGuard`, an
ASGI middleware in front of the routes of every listener (native and BlindAI), does
before the route runs what can be done before the body:

- the tenant's concurrency slot (`TenantQuotas.slot`) is taken for every request whose
  body is chunked or declared larger than SMALL_BODY (uploads included), so one tenant's
  unfinished bodies count against its own limit (429 too_many_concurrent), not against
  everyone's memory; the route then uses that slot (`tenant_slot`);
- `BodyBudget`, shared by every listener of the process, bounds the bodies being
  received at once (--max-concurrent-bodies) and their bytes (--max-body-buffer-bytes):
  past either the request is answered 503 "overloaded" at once, before reading;
- a body must arrive in time: no pause longer than --body-timeout-s, and after that
  grace an average of at least --min-body-rate bytes per second (each byte received
  buys 1/rate seconds). A body that stalls or falls behind is answered 408
  "request_timeout" with `Connection: close`; what was read of it is dropped with the
  request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, nullcontext
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blindinfer.errors import BlindInferError
from blindinfer.protocol.error_shapes import error_body
from blindinfer.runtime.errors import OverloadedError
from blindinfer.server.auth import Authenticator
from blindinfer.server.bodies import (
    DRAIN_LIMIT,
    StoredBytesRoom,
    body_headers,
    parse_content_length,
)
from blindinfer.server.config import ConnectionLimits
from blindinfer.server.errors import (
    MissingHeaderError,
    RequestTimeoutError,
    response_headers,
    status_and_code,
)
from blindinfer.server.quotas import TenantQuotas
from blindinfer.store.registry import ModelRegistry

SMALL_BODY = DRAIN_LIMIT
"""A body declared no larger takes no tenant slot here (its route may take one)."""
SLOT_SCOPE_KEY = "blindinfer.tenant_slot"
"""Set in the request's scope when `BodyGuard` holds the tenant's slot for it."""


class BodyBudget:
    """The request bodies being received by the whole process, and their bytes.

    Thread-safe: the native server and the BlindAI listeners run on different event
    loops. The lock is held for a few additions only, never across an await.
    """

    def __init__(self, max_bodies: int, max_bytes: int) -> None:
        self.max_bodies = max_bodies
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._bodies = 0
        self._bytes = 0

    @classmethod
    def from_limits(cls, limits: ConnectionLimits) -> BodyBudget:
        return cls(limits.max_concurrent_bodies, limits.max_body_buffer_bytes)

    @property
    def usage(self) -> tuple[int, int]:
        """(bodies, bytes) being received now, for tests and statistics."""
        with self._lock:
            return self._bodies, self._bytes

    def open(self) -> None:
        """Counts one more body, or refuses (503). Its bytes are counted as they arrive
        (`grow`): a declared Content-Length is no memory until it is sent."""
        with self._lock:
            if self._bodies >= self.max_bodies:
                raise OverloadedError(
                    f"the server is receiving its maximum of {self.max_bodies} request "
                    "bodies at once (--max-concurrent-bodies); retry shortly",
                    retry_after_s=1,
                )
            self._bodies += 1

    def grow(self, more: int) -> None:
        """Counts `more` bytes received for an open body, or refuses (503)."""
        with self._lock:
            self._check_bytes(more)
            self._bytes += more

    def close(self, reserved: int, *, still_open: bool) -> None:
        with self._lock:
            self._bytes -= reserved
            if still_open:
                self._bodies -= 1

    def body_done(self) -> None:
        """The body is complete: it no longer counts as being received (its bytes do,
        until the request ends)."""
        with self._lock:
            self._bodies -= 1

    def _check_bytes(self, more: int) -> None:
        if self._bytes + more > self.max_bytes:
            raise OverloadedError(
                f"the request bodies being received would exceed {self.max_bytes} bytes "
                "(--max-body-buffer-bytes); retry shortly",
                retry_after_s=1,
            )


def _has_body(scope: Scope) -> tuple[bool, int]:
    """Whether the request carries a body, and the bytes it declares (0 if chunked)."""
    chunked, length = body_headers(scope["headers"])
    if chunked:
        return True, 0
    try:
        declared = parse_content_length(length) or 0
    except MissingHeaderError:
        return False, 0  # the route answers 400 for it before reading anything
    return declared > 0, declared


class BodyGuard:
    """The ASGI middleware of the module docstring. The tenant comes from the
    Authorization header (no rate token, no audit: the route does that once, and answers
    401 for a bad key, which passes through here without a slot)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: ConnectionLimits,
        budget: BodyBudget,
        quotas: TenantQuotas,
        authenticator: Authenticator,
    ) -> None:
        self.app = app
        self.limits = limits
        self.budget = budget
        self.quotas = quotas
        self.authenticator = authenticator

    def _tenant(self, headers: Headers) -> str | None:
        if not self.quotas.enabled:
            return None
        try:
            return self.authenticator.authenticate(headers.get("authorization")).tenant
        except BlindInferError:
            return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        has_body, declared = _has_body(scope)
        if not has_body:
            await self.app(scope, receive, send)
            return
        # a small declared body (an attestation nonce, a share list) is no memory to
        # speak of: its route takes the slot where it needs one, as before
        large = declared == 0 or declared > SMALL_BODY
        tenant = self._tenant(Headers(scope=scope)) if large else None
        if tenant is None:  # no slot to hold, so no exit stack (every small inference)
            try:
                self.budget.open()
            except BlindInferError as exc:  # refused before the route runs (503)
                await _refuse(scope, send, exc)
                return
            await self._guarded(scope, receive, send)
            return
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.quotas.slot(tenant))
                scope[SLOT_SCOPE_KEY] = True
                self.budget.open()
            except BlindInferError as exc:  # refused before the route runs (429, 503)
                await _refuse(scope, send, exc)
                return
            await self._guarded(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        budget, limits = self.budget, self.limits
        reserved, received, complete = 0, 0, False
        started: float | None = None
        timed_out = False

        async def timed_receive() -> Message:
            nonlocal reserved, received, complete, started, timed_out
            if complete:
                return await receive()
            loop = asyncio.get_running_loop()
            now = loop.time()
            if started is None:
                started = now
            # on average: the grace, plus 1/rate per byte received; and never more than
            # the grace without a byte, however much came before
            deadline = started + limits.body_timeout_s + received / limits.min_body_rate
            wait = min(deadline - now, limits.body_timeout_s)
            try:
                if wait <= 0:  # past the deadline: refused without another look
                    raise TimeoutError
                message = await receive_within(receive, wait)
            except TimeoutError:
                timed_out = True
                raise RequestTimeoutError(
                    f"the request body stalled or came too slowly ({received} bytes in "
                    f"{loop.time() - started:.1f} s): the server waits at most "
                    f"{limits.body_timeout_s:g} s for more of it (--body-timeout-s), and "
                    f"needs at least {limits.min_body_rate} bytes per second on average "
                    "after that (--min-body-rate)"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > reserved:
                    budget.grow(received - reserved)
                    reserved = received
                if not message.get("more_body", False):
                    complete = True
                    budget.body_done()
            return message

        async def send_and_close(message: Message) -> None:
            if message["type"] == "http.response.start" and timed_out:
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"connection", b"close")],
                }
            await send(message)

        try:
            await self.app(scope, timed_receive, send_and_close)
        finally:
            budget.close(reserved, still_open=not complete)


async def receive_within(receive: Receive, wait: float) -> Message:
    """`await receive()`, given up after `wait` seconds (TimeoutError), as
    `asyncio.wait_for` would; but a message that is already there (a body that came with
    its head: every small request) is returned at once, with no timer and no turn of the
    event loop. Python 3.11's `wait_for` runs `receive()` as a task of its own (two turns
    of the loop more per message), and even a timer costs more than the rest of the body
    guard (uvloop starts and stops a libuv timer for it). The timer is armed only once
    `receive()` has to wait: a body that is slow or stalls is cut exactly as before."""
    steps = receive().__await__()
    try:
        pending = steps.send(None)  # runs `receive()` up to where it would wait
    except StopIteration as done:
        message: Message = done.value
        return message
    async with asyncio.timeout(wait):
        return await _Resumed(steps, pending)


class _Resumed:
    """What `yield from steps` does, for `steps` (a coroutine's `__await__`) that have
    already run up to their first wait and yielded `pending` (the future they wait for):
    hands that to this task, then passes what the task sends or throws (the timeout's
    cancellation) on to `steps` until they finish."""

    __slots__ = ("_pending", "_steps")

    def __init__(self, steps: Generator[Any, None, Message], pending: Any) -> None:
        self._steps = steps
        self._pending = pending

    def __await__(self) -> Generator[Any, None, Message]:
        steps, pending = self._steps, self._pending
        while True:
            try:
                yield pending
            except GeneratorExit:  # this task is being destroyed: so are the steps
                steps.close()
                raise
            except BaseException as exc:
                try:
                    pending = steps.throw(exc)
                except StopIteration as done:
                    message: Message = done.value
                    return message
            else:
                try:
                    pending = steps.send(None)
                except StopIteration as done:
                    message = done.value
                    return message


async def _refuse(scope: Scope, send: Send, exc: BlindInferError) -> None:
    """The error answer of `exc`, as the routes would give it (in the shape of the API
    the path belongs to), closing the connection (the body is unread)."""
    status, code, message = status_and_code(exc)
    headers = [
        (b"content-type", b"application/json"),
        (b"connection", b"close"),
        *(
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in response_headers(exc).items()
        ),
    ]
    body = error_body(scope["path"], status, code, message)
    headers.append((b"content-length", str(len(body)).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def tenant_slot(
    request: Request, quotas: TenantQuotas, tenant: str
) -> AbstractAsyncContextManager[None]:
    """The tenant's concurrency slot for this request (`async with`): the one `BodyGuard`
    already holds for it, or a new one (a request without a body, or a small one). The
    slot's own context manager, not one wrapped in another: one less per inference."""
    if request.scope.get(SLOT_SCOPE_KEY):
        return nullcontext()
    return quotas.slot(tenant)


def stored_bytes_room(
    quotas: TenantQuotas, registry: ModelRegistry, tenant: str, name: str | None
) -> StoredBytesRoom | None:
    """The stored bytes `tenant` has left, for an upload whose size is unknown until it
    has streamed in (no Content-Length); a model it replaces by name frees its size.
    None in open mode. `ModelRegistry.add` still decides, atomically, at the end."""
    limits = quotas.limits(tenant)
    if limits is None:
        return None
    _, stored = registry.usage(tenant)
    replaced = 0
    if name is not None:
        replaced = max(
            (r.size for r in registry.records(lambda r: r.owner == tenant and r.name == name)),
            default=0,
        )
    room = max(0, limits.max_stored_bytes - stored + replaced)
    return StoredBytesRoom(tenant, room, limits.max_stored_bytes)
