"""The Open Inference Protocol generate extension, as Triton serves it.

`POST /v2/models/{name}[/versions/{v}]/generate` answers one JSON object;
`.../generate_stream` answers server-sent events, one object per `data:` line, and
(unlike OpenAI) no `[DONE]`: the stream ends when the response does.

Request (`parse_generate_request`):

    {"text_input": "<prompt>",
     "parameters": {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}}

Triton passes other top-level members on to the model as tensors and other parameters
to the backend; blindinfer has neither, so any other member or parameter is refused
(`unknown_parameter`), never ignored. The sampling parameters are parsed by the same code
as the OpenAI API's (`generation.parse_sampling`), with the same bounds; `max_tokens`
defaults to 16 (vLLM's default, as Triton's vLLM backend has it). `stream`, if given,
must agree with the route: `true` on `/generate` or `false` on `/generate_stream` is
refused rather than half-honoured.

Responses: `{"model_name", "model_version", "text_output"}` as Triton's, plus on the
final object `finish_reason` ("stop" or "length"), `prompt_tokens` and
`completion_tokens` (totals for the request), and the generation's signed `receipt` (a JWS
object, docs/receipts.md) where the server gives one. Streamed, each event's `text_output` is
the next piece of text and the last event carries the finish reason and the counts with
an empty `text_output`. Errors are OIP's `{"error": "<message>"}` with blindinfer's
`"code"`, as every other OIP route answers; inside a stream that has started, the same
object as an event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from blindinfer.protocol import sse, strict_json
from blindinfer.protocol.generation import (
    FinishReason,
    GenerationLimits,
    ParameterError,
    SamplingParams,
    Usage,
    optional_bool,
    parse_sampling,
    require_object,
    text,
)
from blindinfer.protocol.shown import shown

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "GenerateRequest",
    "error_body",
    "error_event",
    "generate_response",
    "parse_generate_request",
    "stream_end",
    "stream_text",
]

DEFAULT_MAX_TOKENS: Final = 16
_TOP_LEVEL: Final = frozenset({"text_input", "parameters"})
_PARAMETERS: Final = frozenset(
    {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}
)
_FINISH_REASONS: Final = frozenset({"stop", "length"})


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A parsed generate request; `stream` is the route's (the parameter agreed with it)."""

    text_input: str
    sampling: SamplingParams
    stream: bool


def _known(doc: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
    for key in doc:
        if key not in allowed:
            raise ParameterError(
                "unknown_parameter",
                f"unknown parameter {shown(prefix + key)}: blindinfer refuses fields it "
                "does not know rather than ignore them",
                prefix + key,
            )


def parse_generate_request(
    body: bytes, limits: GenerationLimits, *, streaming: bool
) -> GenerateRequest:
    """Parse a generate request body for `/generate` (`streaming` False) or
    `/generate_stream` (True); raises only `ParameterError`/`ProtocolError`."""
    if len(body) > limits.max_body_bytes:
        raise ParameterError(
            "request_too_large",
            f"the request body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}",
        )
    doc = require_object(strict_json.loads(body, allow_nan=False), "the request body")
    _known(doc, _TOP_LEVEL, "")
    if doc.get("text_input") is None:
        raise ParameterError("invalid_request", "text_input is required", "text_input")
    value = doc["text_input"]
    if isinstance(value, str) and len(value) > limits.max_prompt_chars:
        raise ParameterError(
            "prompt_too_large",
            f"text_input exceeds {limits.max_prompt_chars} characters",
            "text_input",
        )
    prompt = text(value, "text_input", max_chars=limits.max_prompt_chars, allow_empty=False)
    raw_params = doc.get("parameters")
    params = {} if raw_params is None else require_object(raw_params, "parameters", "parameters")
    _known(params, _PARAMETERS, "parameters.")
    sampling = parse_sampling(
        params, limits, default_max_tokens=DEFAULT_MAX_TOKENS, prefix="parameters."
    )
    stream = optional_bool(params, "stream", "parameters.stream")
    if stream is not None and stream != streaming:
        route = "generate_stream" if streaming else "generate"
        raise ParameterError(
            "invalid_parameter",
            f"parameters.stream is {str(stream).lower()} on /{route}: use "
            f"/{'generate_stream' if stream else 'generate'} or leave it out",
            "parameters.stream",
        )
    return GenerateRequest(prompt, sampling, streaming)


def _finish(reason: FinishReason) -> str:
    if reason not in _FINISH_REASONS:  # a server bug, not a client error
        raise ValueError(f"finish_reason must be 'stop' or 'length', got {reason!r}")
    return reason


def _final(
    model_name: str,
    model_version: str,
    text_output: str,
    finish_reason: FinishReason,
    usage: Usage,
    receipt: Mapping[str, str] | None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "text_output": text_output,
        "finish_reason": _finish(finish_reason),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }
    if receipt is not None:
        doc["receipt"] = dict(receipt)
    return doc


def generate_response(
    *,
    model_name: str,
    model_version: str,
    text_output: str,
    finish_reason: FinishReason,
    usage: Usage,
    receipt: Mapping[str, str] | None = None,
) -> bytes:
    """The `/generate` response body (with the generation's `receipt`, if given)."""
    return sse.dumps(_final(model_name, model_version, text_output, finish_reason, usage, receipt))


def stream_text(*, model_name: str, model_version: str, text_output: str) -> bytes:
    """One `/generate_stream` event carrying the next piece of text."""
    return sse.event(
        {"model_name": model_name, "model_version": model_version, "text_output": text_output}
    )


def stream_end(
    *,
    model_name: str,
    model_version: str,
    finish_reason: FinishReason,
    usage: Usage,
    receipt: Mapping[str, str] | None = None,
) -> bytes:
    """The last `/generate_stream` event: no text, the finish reason and token counts (and
    the generation's `receipt`, if given)."""
    return sse.event(_final(model_name, model_version, "", finish_reason, usage, receipt))


def error_event(code: str, message: str) -> bytes:
    """An error inside a `/generate_stream` response that has started (status 200)."""
    return sse.event(_error(code, message))


def _error(code: str, message: str) -> dict[str, str]:
    """The same object as `inference.encode_error` writes (without importing numpy)."""
    return {"error": message, "code": code}


def error_body(code: str, message: str) -> bytes:
    """A `/generate` error body, or one for a stream refused before it started."""
    return sse.dumps(_error(code, message))
