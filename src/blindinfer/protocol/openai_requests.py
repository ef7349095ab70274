"""Request bodies of the OpenAI-compatible API, parsed once into frozen, bounded values.

`POST /v1/chat/completions` -> `ChatCompletionRequest`, `POST /v1/completions` ->
`CompletionRequest`. What is accepted, what is refused and why:

- Every top-level field is either supported, or defined by the OpenAI API but not done
  here (`unsupported_parameter`), or unknown (`unknown_parameter`). Nothing is dropped:
  a client that asks for tools, logprobs or n=3 learns at once that it will not get them.
  A field set to `null`, or to the value that asks for nothing (`n: 1`,
  `presence_penalty: 0`, `logprobs: false`, `response_format: {"type": "text"}`, ...),
  is accepted, because it means what the server does anyway.
- Chat messages: roles system, user, assistant, developer; content a string or a list
  of `{"type": "text", "text": ...}` parts, joined with "\\n" (as vLLM does) into the one
  string the chat template receives. Tool/function roles, tool calls, images, audio,
  files and per-message `name` are refused. Count and total characters are bounded.
- Completion prompt: a non-empty string, or a list holding exactly one. Several prompts
  (a batch) and token ids are refused: one request is one generation, and a prompt is
  text, so that receipts and the tokenizer see the same thing.
- `max_tokens` (and chat's `max_completion_tokens`) above the server's limit is refused,
  not lowered. Absent: chat generates up to the server limit (as OpenAI goes up to the
  context), completions 16 tokens (OpenAI's documented default).
- `user` is accepted, bounded, and not kept. `stream_options` only with `stream: true`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from blindinfer.protocol import strict_json
from blindinfer.protocol.generation import (
    GenerationLimits,
    ParameterError,
    SamplingParams,
    optional_bool,
    optional_str,
    parse_sampling,
    require_object,
    text,
)
from blindinfer.protocol.shown import shown

__all__ = [
    "COMPLETION_DEFAULT_MAX_TOKENS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "Role",
    "parse_chat_completion_request",
    "parse_completion_request",
]

Role = Literal["system", "user", "assistant", "developer"]
_ROLES: Final[frozenset[str]] = frozenset({"system", "user", "assistant", "developer"})
COMPLETION_DEFAULT_MAX_TOKENS: Final = 16


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn; `content` is the text the chat template receives."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ChatCompletionRequest:
    """A parsed `POST /v1/chat/completions` body."""

    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A parsed `POST /v1/completions` body."""

    model: str
    prompt: str
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False


# --------------------------------------------------------------------------- field tables

_Neutral = Callable[[object], bool]


def _equals(expected: object) -> _Neutral:
    """Exact JSON equality: `True` is not `1`, `1.0` is `1` only for numbers."""

    def check(value: object) -> bool:
        if isinstance(expected, bool) or isinstance(value, bool):
            return type(value) is type(expected) and value == expected
        return value == expected

    return check


def _never(value: object) -> bool:
    return False


def _empty_object(value: object) -> bool:
    return value == {}


_IS_ZERO: Final = _equals(0)

# OpenAI fields blindinfer does not do, with the value that asks for nothing.
_COMMON_UNSUPPORTED: Final[dict[str, _Neutral]] = {
    "n": _equals(1),
    "presence_penalty": _IS_ZERO,
    "frequency_penalty": _IS_ZERO,
    "logit_bias": _empty_object,
}
_CHAT_UNSUPPORTED: Final[dict[str, _Neutral]] = {
    **_COMMON_UNSUPPORTED,
    "logprobs": _equals(False),
    "top_logprobs": _never,
    "response_format": _equals({"type": "text"}),
    "tools": _never,
    "tool_choice": _equals("none"),
    "parallel_tool_calls": _never,
    "functions": _never,
    "function_call": _equals("none"),
    "audio": _never,
    "modalities": _equals(["text"]),
    "prediction": _never,
    "store": _equals(False),
    "metadata": _never,
    "service_tier": _never,
    "reasoning_effort": _never,
    "verbosity": _never,
    "web_search_options": _never,
    "moderation": _never,
    "prompt_cache_key": _never,
    "prompt_cache_options": _never,
    "prompt_cache_retention": _never,
    "safety_identifier": _never,
}
_COMPLETION_UNSUPPORTED: Final[dict[str, _Neutral]] = {
    **_COMMON_UNSUPPORTED,
    "logprobs": _never,
    "echo": _equals(False),
    "best_of": _equals(1),
    "suffix": _never,
}
_SAMPLING: Final = frozenset({"temperature", "top_p", "top_k", "seed", "stop"})
_CHAT_SUPPORTED: Final = _SAMPLING | {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "user",
}
_COMPLETION_SUPPORTED: Final = _SAMPLING | {
    "model",
    "prompt",
    "max_tokens",
    "stream",
    "stream_options",
    "user",
}
_MESSAGE_UNSUPPORTED: Final[dict[str, _Neutral]] = {
    "name": _never,
    "tool_calls": _never,
    "tool_call_id": _never,
    "function_call": _never,
    "refusal": _never,
    "audio": _never,
}
_STREAM_OPTIONS_UNSUPPORTED: Final[dict[str, _Neutral]] = {
    "include_obfuscation": _equals(False),
}
_PART_TYPES_UNSUPPORTED: Final = frozenset(
    {"image_url", "input_audio", "file", "refusal", "input_image", "input_file"}
)


def _check_fields(
    doc: Mapping[str, Any],
    supported: frozenset[str],
    unsupported: Mapping[str, _Neutral],
    prefix: str = "",
) -> None:
    """Refuse, in document order, the first field that is unsupported or unknown."""
    for key, value in doc.items():
        if key in supported:
            continue
        neutral = unsupported.get(key)
        if neutral is None:  # even when null: an unknown name may be a typo of a real one
            raise ParameterError(
                "unknown_parameter",
                f"unknown parameter {shown(prefix + key)}: blindinfer refuses fields it "
                "does not know rather than ignore them",
                prefix + key,
            )
        if value is not None and not neutral(value):
            raise ParameterError(
                "unsupported_parameter",
                f"{prefix + key} is not supported by this server (docs/generative.md lists "
                "what is)",
                prefix + key,
            )


# --------------------------------------------------------------------------- common parts


def _document(body: bytes, limits: GenerationLimits) -> dict[str, Any]:
    if len(body) > limits.max_body_bytes:
        raise ParameterError(
            "request_too_large",
            f"the request body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}",
        )
    return require_object(strict_json.loads(body, allow_nan=False), "the request body")


def _model(doc: Mapping[str, Any], limits: GenerationLimits) -> str:
    if doc.get("model") is None:
        raise ParameterError("invalid_request", "model is required", "model")
    return text(doc["model"], "model", max_chars=limits.max_name_length, allow_empty=False)


def _streaming(doc: Mapping[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = bool(optional_bool(doc, "stream", "stream"))
    options = doc.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise ParameterError(
            "invalid_parameter",
            "stream_options is only allowed with stream: true",
            "stream_options",
        )
    options = require_object(options, "stream_options", "stream_options")
    _check_fields(
        options, frozenset({"include_usage"}), _STREAM_OPTIONS_UNSUPPORTED, "stream_options."
    )
    include = optional_bool(options, "include_usage", "stream_options.include_usage")
    return stream, bool(include)


class _Budget:
    """Characters of prompt text left for the rest of the request."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.limit = limit

    def take(self, value: object, param: str) -> str:
        """`value` as prompt text (a bounded, valid string), counted against the budget."""
        if isinstance(value, str) and len(value) > self.left:
            raise ParameterError(
                "prompt_too_large",
                f"the prompt text exceeds {self.limit} characters (at {param})",
                param,
            )
        checked = text(value, param, max_chars=self.limit)
        self.left -= len(checked)
        return checked


# --------------------------------------------------------------------------- chat


def _content(value: object, param: str, limits: GenerationLimits, budget: _Budget) -> str:
    if value is None:
        raise ParameterError("invalid_parameter", f"{param} is required", param)
    if isinstance(value, str):
        return budget.take(value, param)
    if not isinstance(value, list):
        raise ParameterError(
            "invalid_parameter", f"{param} must be a string or a list of text parts", param
        )
    if not value:
        raise ParameterError("invalid_parameter", f"{param} holds no parts", param)
    if len(value) > limits.max_content_parts:
        raise ParameterError(
            "prompt_too_large",
            f"{param} holds {len(value)} parts; the limit is {limits.max_content_parts}",
            param,
        )
    texts: list[str] = []
    for index, raw in enumerate(value):
        where = f"{param}[{index}]"
        part = require_object(raw, where, where)
        kind = part.get("type")
        if kind in _PART_TYPES_UNSUPPORTED:
            raise ParameterError(
                "unsupported_parameter",
                f"{where}.type {kind} is not supported: content parts must be text",
                where + ".type",
            )
        if kind != "text":
            raise ParameterError(
                "invalid_parameter", f'{where}.type must be "text"', where + ".type"
            )
        _check_fields(part, frozenset({"type", "text"}), {}, where + ".")
        if part.get("text") is None:
            raise ParameterError("invalid_parameter", f"{where}.text is required", where + ".text")
        texts.append(budget.take(part["text"], where + ".text"))
    return "\n".join(texts)


def _message(raw: object, index: int, limits: GenerationLimits, budget: _Budget) -> ChatMessage:
    where = f"messages[{index}]"
    message = require_object(raw, where, where)
    _check_fields(message, frozenset({"role", "content"}), _MESSAGE_UNSUPPORTED, where + ".")
    role = message.get("role")
    if role in ("tool", "function"):
        raise ParameterError(
            "unsupported_parameter",
            f"{where}.role {role} is not supported: this server does not call tools",
            where + ".role",
        )
    if not isinstance(role, str) or role not in _ROLES:
        raise ParameterError(
            "invalid_parameter",
            f"{where}.role must be one of {', '.join(sorted(_ROLES))}",
            where + ".role",
        )
    content = _content(message.get("content"), where + ".content", limits, budget)
    return ChatMessage(role, content)  # type: ignore[arg-type]  # checked against _ROLES


def parse_chat_completion_request(body: bytes, limits: GenerationLimits) -> ChatCompletionRequest:
    """Parse a chat completion request body; raises only `ParameterError`/`ProtocolError`."""
    doc = _document(body, limits)
    _check_fields(doc, _CHAT_SUPPORTED, _CHAT_UNSUPPORTED)
    model = _model(doc, limits)
    raw = doc.get("messages")
    if raw is None:
        raise ParameterError("invalid_request", "messages is required", "messages")
    if not isinstance(raw, list) or not raw:
        raise ParameterError(
            "invalid_parameter", "messages must be a non-empty list of messages", "messages"
        )
    if len(raw) > limits.max_messages:
        raise ParameterError(
            "prompt_too_large",
            f"{len(raw)} messages exceed the limit of {limits.max_messages}",
            "messages",
        )
    budget = _Budget(limits.max_prompt_chars)
    messages = tuple(_message(item, i, limits, budget) for i, item in enumerate(raw))
    sampling = parse_sampling(
        doc,
        limits,
        default_max_tokens=limits.max_new_tokens,
        max_tokens_keys=("max_completion_tokens", "max_tokens"),
    )
    stream, include_usage = _streaming(doc)
    optional_str(doc, "user", "user", max_chars=limits.max_name_length)  # bounded, not kept
    return ChatCompletionRequest(model, messages, sampling, stream, include_usage)


# --------------------------------------------------------------------------- completions


def _prompt(value: object, limits: GenerationLimits) -> str:
    if value is None:
        raise ParameterError("invalid_request", "prompt is required", "prompt")
    param = "prompt"
    if isinstance(value, list):
        token_ids = bool(value) and all(type(v) is int or isinstance(v, list) for v in value)
        if token_ids:
            raise ParameterError(
                "unsupported_parameter",
                "prompt as token ids is not supported; send the prompt as text",
                param,
            )
        if len(value) != 1:
            raise ParameterError(
                "unsupported_parameter" if value else "invalid_parameter",
                "prompt must be one string (a list of several prompts is a batch, which "
                "this server does not take in one request)",
                param,
            )
        value, param = value[0], "prompt[0]"
    prompt = _Budget(limits.max_prompt_chars).take(value, param)
    if not prompt:
        raise ParameterError("invalid_parameter", f"{param} must not be empty", param)
    return prompt


def parse_completion_request(body: bytes, limits: GenerationLimits) -> CompletionRequest:
    """Parse a (legacy) completion request body; raises only `ParameterError`/`ProtocolError`."""
    doc = _document(body, limits)
    _check_fields(doc, _COMPLETION_SUPPORTED, _COMPLETION_UNSUPPORTED)
    model = _model(doc, limits)
    prompt = _prompt(doc.get("prompt"), limits)
    sampling = parse_sampling(doc, limits, default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS)
    stream, include_usage = _streaming(doc)
    optional_str(doc, "user", "user", max_chars=limits.max_name_length)  # bounded, not kept
    return CompletionRequest(model, prompt, sampling, stream, include_usage)
