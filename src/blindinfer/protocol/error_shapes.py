"""Which error shape an answer has, decided by the request's path: one rule for every
error the routes do not write themselves (middleware refusals such as a 415 for a wrong
Content-Type, a 413 or 429 before the body is read, a 404 or 405 from the router, a 500).

- `/v1/...` is the OpenAI-compatible API: `{"error": {"message", "type", "param",
  "code"}}`, the shape the `openai` SDK parses (a `/v2` body there would reach its users
  as an error without message or code).
- Everything else is the Open Inference Protocol's `{"error": "<message>", "code"}`.

Client side (no server imports): the server's error mapping and the proxy both use it.
"""

from __future__ import annotations

from typing import Any, Final

from blindinfer.protocol import oip_generate, openai_responses

OPENAI_PREFIX: Final = "/v1"


def speaks_openai(path: str) -> bool:
    """True for the OpenAI-compatible API's paths (`/v1` and below)."""
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_body(path: str, status: int, code: str, message: str) -> bytes:
    """The error body for a request to `path`, in its API's shape."""
    if speaks_openai(path):
        return openai_responses.error_body(status, code, message)
    return oip_generate.error_body(code, message)


def error_document(path: str, status: int, code: str, message: str) -> dict[str, Any]:
    """`error_body` as a JSON document, for answers built as documents (the proxy)."""
    if speaks_openai(path):
        return {
            "error": {
                "message": message,
                "type": openai_responses.error_type(status),
                "param": None,
                "code": code,
            }
        }
    return {"error": message, "code": code}


__all__ = ["OPENAI_PREFIX", "error_body", "error_document", "speaks_openai"]
