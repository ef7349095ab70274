"""The OpenAI-compatible API's wire format, in one import.

The implementation is split by job: `openai_requests` parses request bodies once into
frozen, bounded values (what is supported and what is refused is listed there and in
docs/generative.md), `openai_responses` builds response bodies and stream events,
`generation` holds what the OpenAI and OIP generate formats share (`SamplingParams`,
`GenerationLimits`, `ParameterError`, `Usage`), and `sse` the event framing.
No server route and no engine is involved: these are pure functions of bytes and values.
"""

from __future__ import annotations

from blindinfer.protocol.generation import (
    ERROR_CODES,
    FinishReason,
    GenerationLimits,
    ParameterError,
    SamplingParams,
    Usage,
)
from blindinfer.protocol.openai_requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    parse_chat_completion_request,
    parse_completion_request,
)
from blindinfer.protocol.openai_responses import (
    ChatCompletionStream,
    CompletionStream,
    chat_completion,
    error_body,
    error_event,
    error_type,
    new_id,
    now,
    text_completion,
)

__all__ = [
    "ERROR_CODES",
    "ChatCompletionRequest",
    "ChatCompletionStream",
    "ChatMessage",
    "CompletionRequest",
    "CompletionStream",
    "FinishReason",
    "GenerationLimits",
    "ParameterError",
    "SamplingParams",
    "Usage",
    "chat_completion",
    "error_body",
    "error_event",
    "error_type",
    "new_id",
    "now",
    "parse_chat_completion_request",
    "parse_completion_request",
    "text_completion",
]
