"""Reading request bodies with a bound: the limit is enforced while streaming, so an
oversized body is refused after at most `limit` bytes, whatever Content-Length claims."""

from __future__ import annotations

import hashlib

from starlette.requests import Request

from blindinfer.server.errors import MissingHeaderError, PayloadTooLargeError


def _declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not (declared.isascii() and declared.isdigit()) or len(declared) > 19:
        raise MissingHeaderError("Content-Length must be a non-negative decimal integer")
    if int(declared) > limit:
        raise PayloadTooLargeError(f"the body is {declared} bytes; the limit is {limit} bytes")


async def read_bounded(request: Request, limit: int) -> bytes:
    _declared_length(request, limit)
    chunks = bytearray()
    async for chunk in request.stream():
        if len(chunks) + len(chunk) > limit:
            raise PayloadTooLargeError(f"the body is larger than the limit of {limit} bytes")
        chunks += chunk
    return bytes(chunks)


async def read_bounded_hashed(request: Request, limit: int) -> tuple[bytes, str]:
    """Streams an upload while hashing it, so the SHA-256 costs no second pass."""
    _declared_length(request, limit)
    chunks = bytearray()
    digest = hashlib.sha256()
    async for chunk in request.stream():
        if len(chunks) + len(chunk) > limit:
            raise PayloadTooLargeError(f"the model is larger than the limit of {limit} bytes")
        chunks += chunk
        digest.update(chunk)
    return bytes(chunks), digest.hexdigest()
