"""Which request Content-Type each route accepts: one table for the server and the proxy.

Why it matters: a web page can make the user's browser send a cross-origin POST without a
CORS preflight only as a "simple request", whose Content-Type is `text/plain`,
`application/x-www-form-urlencoded` or `multipart/form-data`. No route reads any of these,
so refusing every Content-Type that the route does not parse (415,
`unsupported_media_type`) makes such a request fail before it does anything, wherever it
lands: on the server, or on `blindinfer proxy`, which would otherwise add its API key.

- JSON routes (everything but the two below) take `application/json`.
- Model upload (`/v2/repository/models/{name}/upload`) takes `application/octet-stream`
  (an ONNX file, what blindinfer's client sends) or `application/x-tar` (a generative model
  folder as `blindinfer.protocol.model_archive`'s archive).
- Inference takes `application/json`, or `application/octet-stream` for the binary tensor
  extension (a JSON header followed by raw tensors).
- Parameters (`; charset=utf-8`) and letter case are ignored.

A request without Content-Type is accepted: tritonclient and BlindAI's 0.6.3 client send
none (Triton itself ignores the header). A browser omits it only for a Blob or
ArrayBuffer body, and such a cross-origin request carries an `Origin` header, which the
proxy refuses unless the user allowed that origin (see `blindinfer.proxy.guard`).

This module is client side (no server imports): the proxy uses it too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

JSON: Final = "application/json"
OCTET_STREAM: Final = "application/octet-stream"
CBOR: Final = "application/cbor"
TAR: Final = "application/x-tar"
UNSUPPORTED_MEDIA_TYPE: Final = "unsupported_media_type"
"""The machine code of the 415 answer, on the server and on the proxy."""

JSON_ONLY: Final = frozenset({JSON})
UPLOAD_TYPES: Final = frozenset({OCTET_STREAM, TAR})
INFER_TYPES: Final = frozenset({JSON, OCTET_STREAM})
BLINDAI_TYPES: Final = frozenset({CBOR, OCTET_STREAM})
"""BlindAI Core's routes read CBOR; its client sends no Content-Type at all."""

_UPLOAD = re.compile(r"/v2/repository/models/[^/]+/upload/?")
_INFER = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer/?")
_SHOWN = 80  # characters of a refused Content-Type quoted back


def media_type(value: str) -> str:
    """`Application/JSON; charset=utf-8` -> `application/json`."""
    return value.split(";", 1)[0].strip().lower()


def oip_media_types(path: str) -> frozenset[str]:
    """The Content-Types the Open Inference Protocol route at `path` accepts."""
    if _UPLOAD.fullmatch(path):
        return UPLOAD_TYPES
    if _INFER.fullmatch(path):
        return INFER_TYPES
    return JSON_ONLY


def blindai_media_types(path: str) -> frozenset[str]:
    """The Content-Types BlindAI Core's routes accept (all CBOR)."""
    return BLINDAI_TYPES


def content_type_refusal(values: Iterable[str], allowed: frozenset[str]) -> str | None:
    """None when the request's Content-Type header(s) `values` suit the route (no header
    at all does); else the message of the 415 answer."""
    for value in values:
        if media_type(value) not in allowed:
            shown = "".join(c if c.isprintable() and c.isascii() else "?" for c in value)
            if len(shown) > _SHOWN:
                shown = shown[:_SHOWN] + "..."
            return (
                f"this route takes {' or '.join(sorted(allowed))} request bodies, not "
                f"Content-Type {shown!r}"
            )
    return None


def header_values(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Every Content-Type value of an ASGI header list."""
    return [value.decode("latin-1") for name, value in headers if name.lower() == b"content-type"]


__all__ = [
    "BLINDAI_TYPES",
    "CBOR",
    "INFER_TYPES",
    "JSON",
    "JSON_ONLY",
    "OCTET_STREAM",
    "TAR",
    "UNSUPPORTED_MEDIA_TYPE",
    "UPLOAD_TYPES",
    "blindai_media_types",
    "content_type_refusal",
    "header_values",
    "media_type",
    "oip_media_types",
]
