"""Response bodies of the OpenAI-compatible API, as bytes ready to send.

Shapes follow the official `openai` SDK's types (`ChatCompletion`, `ChatCompletionChunk`,
`Completion`), which the tests validate every builder against:

- Non-streamed: one `chat.completion` / `text_completion` object, a single choice of
  index 0, `finish_reason` "stop" or "length", `usage` {prompt, completion, total}.
- Streamed: `ChatCompletionStream` / `CompletionStream` render server-sent events. A chat
  stream opens with a chunk whose delta is `{"role": "assistant", "content": ""}`, sends
  one chunk per piece of text, then a chunk with an empty delta and the finish reason.
  With `stream_options.include_usage` every chunk carries `"usage": null` and a last
  chunk with `"choices": []` carries the usage, as OpenAI does. `data: [DONE]` ends it.
- Receipts: a generation's signed receipt (a JWS object, docs/receipts.md) rides as a
  top-level `"receipt"` field: on the whole object, or on the stream's last chunk before
  `[DONE]` (the finish chunk, or the usage chunk when usage is asked for), never as a chunk
  of its own (code that reads `chunk.choices[0]` must keep working). The SDK keeps it in
  `model_extra["receipt"]`.
- Errors: `{"error": {"message", "type", "param", "code"}}`, `code` being blindinfer's
  machine-readable code; in a stream that has already started, the same object as an
  event followed by `[DONE]` (the SDK raises `APIError` on it).

Ids and timestamps are arguments so that output is reproducible in tests; `new_id` and
`now` give the real ones.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from blindinfer.protocol import sse
from blindinfer.protocol.generation import FinishReason, Usage

__all__ = [
    "ChatCompletionStream",
    "CompletionStream",
    "chat_completion",
    "error_body",
    "error_event",
    "error_type",
    "new_id",
    "now",
    "text_completion",
]

_FINISH_REASONS: Final = frozenset({"stop", "length"})


def new_id(prefix: str) -> str:
    """A fresh, unguessable response id (`chatcmpl-...`, `cmpl-...`)."""
    return prefix + secrets.token_hex(12)


def now() -> int:
    """The `created` timestamp: whole seconds since the epoch."""
    return int(time.time())


def _finish(reason: FinishReason) -> str:
    if reason not in _FINISH_REASONS:  # a server bug, not a client error
        raise ValueError(f"finish_reason must be 'stop' or 'length', got {reason!r}")
    return reason


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _receipted(doc: dict[str, Any], receipt: Mapping[str, str] | None) -> dict[str, Any]:
    if receipt is not None:
        doc["receipt"] = dict(receipt)
    return doc


def chat_completion(
    *,
    id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: FinishReason,
    usage: Usage,
    receipt: Mapping[str, str] | None = None,
) -> bytes:
    """A complete `chat.completion` object (with its `receipt`, if given)."""
    doc = {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": _finish(finish_reason),
            }
        ],
        "usage": _usage(usage),
    }
    return sse.dumps(_receipted(doc, receipt))


def text_completion(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: FinishReason,
    usage: Usage,
    receipt: Mapping[str, str] | None = None,
) -> bytes:
    """A complete `text_completion` object (with its `receipt`, if given)."""
    doc = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": _finish(finish_reason),
            }
        ],
        "usage": _usage(usage),
    }
    return sse.dumps(_receipted(doc, receipt))


@dataclass(frozen=True, slots=True)
class _Stream:
    id: str
    created: int
    model: str
    include_usage: bool = False

    _object: ClassVar[str] = ""

    def _chunk(
        self,
        choices: list[dict[str, Any]],
        usage: Usage | None = None,
        receipt: Mapping[str, str] | None = None,
    ) -> bytes:
        doc: dict[str, Any] = {
            "id": self.id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            doc["usage"] = None if usage is None else _usage(usage)
        return sse.event(_receipted(doc, receipt))

    def _end(
        self, finish: dict[str, Any], usage: Usage, receipt: Mapping[str, str] | None
    ) -> bytes:
        """The finish chunk, the usage chunk if asked for, and `[DONE]`; the receipt rides
        on the last chunk of the two."""
        if not self.include_usage:
            return self._chunk([finish], receipt=receipt) + sse.DONE
        return self._chunk([finish]) + self._chunk([], usage, receipt) + sse.DONE


class ChatCompletionStream(_Stream):
    """Renders one streamed chat completion as server-sent events."""

    __slots__ = ()
    _object: ClassVar[str] = "chat.completion.chunk"

    def _choice(self, delta: dict[str, str], finish: FinishReason | None) -> dict[str, Any]:
        return {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": None if finish is None else _finish(finish),
        }

    def start(self) -> bytes:
        """The first event: the assistant role, no text yet."""
        return self._chunk([self._choice({"role": "assistant", "content": ""}, None)])

    def text(self, piece: str) -> bytes:
        """One event carrying the next piece of generated text."""
        return self._chunk([self._choice({"content": piece}, None)])

    def end(
        self,
        finish_reason: FinishReason,
        usage: Usage,
        receipt: Mapping[str, str] | None = None,
    ) -> bytes:
        """The closing events: finish reason, usage (if asked for), `[DONE]`; `receipt`
        rides on the last chunk before `[DONE]`."""
        return self._end(self._choice({}, finish_reason), usage, receipt)


class CompletionStream(_Stream):
    """Renders one streamed (legacy) text completion as server-sent events."""

    __slots__ = ()
    _object: ClassVar[str] = "text_completion"

    def _choice(self, piece: str, finish: FinishReason | None) -> dict[str, Any]:
        return {
            "index": 0,
            "text": piece,
            "logprobs": None,
            "finish_reason": None if finish is None else _finish(finish),
        }

    def text(self, piece: str) -> bytes:
        """One event carrying the next piece of generated text."""
        return self._chunk([self._choice(piece, None)])

    def end(
        self,
        finish_reason: FinishReason,
        usage: Usage,
        receipt: Mapping[str, str] | None = None,
    ) -> bytes:
        """The closing events: finish reason, usage (if asked for), `[DONE]`; `receipt`
        rides on the last chunk before `[DONE]`."""
        return self._end(self._choice("", finish_reason), usage, receipt)


# --------------------------------------------------------------------------- errors

_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status (5xx: "server_error")."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def _error(status: int, code: str, message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_body(status: int, code: str, message: str, param: str | None = None) -> bytes:
    """An OpenAI-shaped error body carrying blindinfer's machine-readable `code`."""
    return sse.dumps(_error(status, code, message, param))


def error_event(status: int, code: str, message: str, param: str | None = None) -> bytes:
    """An error inside a stream that has started (its HTTP status is already 200)."""
    return sse.event(_error(status, code, message, param)) + sse.DONE
