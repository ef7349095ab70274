"""Server-sent events as the generative streams use them: one `data:` line per event.

Both the OpenAI-compatible streams and Triton's `generate_stream` send each JSON object
as `data: <json>\\n\\n`; OpenAI's end with `data: [DONE]\\n\\n`. The JSON is compact and
ASCII-only (`ensure_ascii`), so it never holds a raw newline or carriage return: one
event is always exactly one `data:` line, whatever text the model produced, and no model
output can forge an event boundary or a `[DONE]`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["CONTENT_TYPE", "DONE", "HEADERS", "dumps", "event"]

CONTENT_TYPE: Final = "text/event-stream; charset=utf-8"
HEADERS: Final[Mapping[str, str]] = {
    "Content-Type": CONTENT_TYPE,
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # a buffering reverse proxy would hold tokens back
}
"""Response headers of a stream."""
DONE: Final = b"data: [DONE]\n\n"
"""The OpenAI stream terminator (Triton's generate_stream has none)."""


def dumps(doc: Mapping[str, Any]) -> bytes:
    """Compact, ASCII-only JSON; NaN/Infinity are refused (they are not JSON)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def event(doc: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying `doc`."""
    return b"data: " + dumps(doc) + b"\n\n"
