"""Reading request bodies with a bound, and what happens to bodies nobody reads.

- The limit is checked against Content-Length before a byte of the body is read (so a
  client hears "too large" at once, not after sending it), and again while streaming, so
  a body without Content-Length is refused after at most `limit` bytes.
- A client that closes the connection mid-body raises `ClientDisconnectedError`: not a
  server failure (see server/errors.py), and nothing read so far is kept.
- `CloseUnreadBodies`: a reply sent before a large body was read in full (every early
  refusal) closes the connection, instead of the server reading and discarding the rest
  of the body to keep the connection alive, and the client sending it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blindinfer.server.errors import (
    ClientDisconnectedError,
    MissingHeaderError,
    PayloadTooLargeError,
)
from blindinfer.server.quotas import QuotaExceededError
from blindinfer.server.upload_digest import BackgroundSha256
from blindinfer.sizes import human_size as human_size

DRAIN_LIMIT = 64 * 1024
"""Unread body bytes the server still reads and drops to keep a connection alive; a
reply that leaves more unread closes the connection."""


def _bytes(size: int) -> str:
    """'1048576 bytes (1.0 MiB)': exact for machines, readable for people."""
    return f"{size} bytes" if size < 1024 else f"{size} bytes ({human_size(size)})"


def parse_content_length(declared: str | None) -> int | None:
    """A Content-Length header's value, None without one (a chunked body); ASCII digits
    only, at most 19 of them (endpoint fuzzing found two 500s before this)."""
    if declared is None:
        return None
    if not (declared.isascii() and declared.isdigit()) or len(declared) > 19:
        raise MissingHeaderError("Content-Length must be a non-negative decimal integer")
    return int(declared)


def body_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bool, str | None]:
    """(whether Transfer-Encoding is present, the first Content-Length value or None) of
    an ASGI header list: what Starlette's `Headers` answers for `"transfer-encoding" in`
    and `.get("content-length")` (names are lower case in ASGI), in one pass and without
    building a `Headers` per request in each middleware that needs these two."""
    chunked = False
    length: str | None = None
    for name, value in headers:
        if name == b"content-length":
            if length is None:
                length = value.decode("latin-1")
        elif name == b"transfer-encoding":
            chunked = True
    return chunked, length


def declared_length(request: Request) -> int | None:
    """The body's Content-Length, None without one (a chunked body)."""
    return parse_content_length(request.headers.get("content-length"))


def too_large_message(what: str, limit: int, setting: str | None, size: int | None = None) -> str:
    """'the model is 9000000 bytes (8.6 MiB); the limit is 200000 bytes (195.3 KiB,
    --max-model-bytes)'; without `size`, '... is larger than the limit of ...'."""
    notes = [human_size(limit)] if limit >= 1024 else []
    if setting:
        notes.append(setting)
    bound = f"{limit} bytes" + (f" ({', '.join(notes)})" if notes else "")
    if size is None:
        return f"{what} is larger than the limit of {bound}"
    return f"{what} is {_bytes(size)}; the limit is {bound}"


def check_declared_length(
    request: Request, limit: int, *, what: str = "the request body", setting: str | None = None
) -> int | None:
    """Refuses (413) a body whose Content-Length is over `limit` before it is read."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise PayloadTooLargeError(too_large_message(what, limit, setting, declared))
    return declared


async def read_bounded(
    request: Request,
    limit: int,
    *,
    what: str = "the request body",
    setting: str | None = None,
) -> bytes:
    """The whole body, at most `limit` bytes (413 otherwise, before reading if it can)."""
    check_declared_length(request, limit, what=what, setting=setting)
    chunks = bytearray()
    try:
        async for chunk in request.stream():
            if len(chunks) + len(chunk) > limit:
                raise PayloadTooLargeError(too_large_message(what, limit, setting))
            chunks += chunk
    except ClientDisconnect:
        raise ClientDisconnectedError("the client disconnected mid-body") from None
    return bytes(chunks)


@dataclass(frozen=True, slots=True)
class StoredBytesRoom:
    """What a tenant may still store: an upload without Content-Length (chunked) could
    not be weighed against the quota before its body, so it is while it streams."""

    tenant: str
    room: int
    quota: int

    def error(self) -> QuotaExceededError:
        return QuotaExceededError(
            f"tenant {self.tenant!r} may store {self.room} more bytes (its quota is "
            f"{self.quota} bytes) and this upload is larger"
        )


async def read_bounded_hashed(
    request: Request,
    limit: int,
    *,
    setting: str | None = None,
    room: StoredBytesRoom | None = None,
    observe: Callable[[bytes], object] | None = None,
) -> tuple[bytes, str]:
    """Streams an upload while hashing it, so the SHA-256 costs no second pass; refused
    as soon as it passes `limit` (413) or the tenant's `room` (403 quota_exceeded).
    `observe(chunk)` sees each chunk as it arrives and may refuse it by raising (a model
    archive's streaming parser: a bad entry is refused before the rest is read)."""
    check_declared_length(request, limit, what="the model", setting=setting)
    # BytesIO, not bytearray + bytes(): its getvalue() hands over its own buffer when it
    # is the only reference, so the model is not copied once more at the end (a 128 MiB
    # copy costs ~100 ms, docs/performance.md)
    chunks = io.BytesIO()
    received = 0
    digest = BackgroundSha256()  # beside the loop's TLS decryption (upload_digest.py)
    try:
        async for chunk in request.stream():
            if received + len(chunk) > limit:
                raise PayloadTooLargeError(too_large_message("the model", limit, setting))
            if room is not None and received + len(chunk) > room.room:
                raise room.error()
            if observe is not None:
                observe(chunk)
            chunk = bytes(chunk) if type(chunk) is not bytes else chunk  # hashed later
            chunks.write(chunk)
            received += len(chunk)
            await digest.feed(chunk)
        sha256 = await digest.hexdigest()
    except ClientDisconnect:
        raise ClientDisconnectedError("the client disconnected mid-upload") from None
    finally:
        digest.close()
    return chunks.getvalue(), sha256


class CloseUnreadBodies:
    """Adds `Connection: close` to a reply sent while more than DRAIN_LIMIT bytes of the
    request body are still unread (or an unknown amount: a chunked body).

    Without it the server would answer at once, then keep the connection by reading and
    discarding the rest of the body, and a client that sends its whole body before it
    reads (most do) would wait for the upload to finish to see the refusal. Closing lets
    its next write fail, and it reads the reply that is already there.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunked, length = body_headers(scope["headers"])
        try:
            declared = parse_content_length(length) or 0
        except MissingHeaderError:
            declared = 0  # the route answers 400 for it; nothing unread to worry about
        if not chunked and declared <= DRAIN_LIMIT:
            await self.app(scope, receive, send)
            return
        received = 0
        complete = False

        async def receive_and_count() -> Message:
            nonlocal received, complete
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            return message

        async def send_and_close(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete:
                unread_is_large = chunked or declared - received > DRAIN_LIMIT
                present = [name.lower() for name, _ in message.get("headers", [])]
                if unread_is_large and b"connection" not in present:
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"connection", b"close")],
                    }
            await send(message)

        await self.app(scope, receive_and_count, send_and_close)
