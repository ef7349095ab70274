"""What the generative wire formats share: bounds, sampling parameters, typed refusals.

The OpenAI-compatible API (`openai_requests`) and the OIP generate extension
(`oip_generate`) both carry the same sampling knobs; they are parsed here, once, into one
frozen `SamplingParams`, so that the engine, the receipts and the two front ends cannot
disagree on what a request asked for.

Strictness (shared by every field parser here):

- A number is a JSON number, never a boolean: Python's `bool` is an `int`, so `True`
  would otherwise pass as `1`. Integers are exact JSON integers (`1.0` is refused where
  an int is expected); floats must be finite (the JSON decoder already refuses NaN).
- JSON `null` means "absent" (the OpenAI API documents its optional fields as nullable).
- Every string is bounded and must be valid Unicode (JSON `"\\ud800"` decodes to a lone
  surrogate that no tokenizer can encode).
- Messages never quote prompt text back: a refusal names the field and what is wrong
  with it, and at most a short, bounded repr of a scalar setting.

Refusals are `ParameterError`, a `ProtocolError` that also names the offending field in
`param` (the OpenAI error shape has a `param` member).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from blindinfer.errors import ProtocolError
from blindinfer.protocol.shown import shown

__all__ = [
    "ERROR_CODES",
    "MAX_SEED",
    "MAX_STOP_SEQUENCES",
    "MAX_TEMPERATURE",
    "FinishReason",
    "GenerationLimits",
    "ParameterError",
    "SamplingParams",
    "Usage",
    "optional_bool",
    "optional_float",
    "optional_int",
    "optional_str",
    "parse_sampling",
    "require_object",
    "text",
]

ERROR_CODES: Final = frozenset(
    {
        "malformed_json",  # not UTF-8 JSON, duplicate key, NaN/Infinity, nested too deep
        "request_too_large",  # body longer than GenerationLimits.max_body_bytes
        "invalid_request",  # not a JSON object, or a required field is missing
        "invalid_parameter",  # a field of the wrong type, or out of its range
        "unsupported_parameter",  # a field the API defines that blindinfer does not do
        "unknown_parameter",  # a field neither the API nor blindinfer defines
        "prompt_too_large",  # too many messages/parts or characters of prompt text
    }
)
"""Every `ProtocolError.code` the generative parsers raise."""

MAX_STOP_SEQUENCES: Final = 4  # the OpenAI API's own limit
MAX_SEED: Final = (1 << 31) - 1
"""Seeds are 0..2**31-1: what every engine we target takes as a non-negative seed."""
MAX_TEMPERATURE: Final = 2.0  # the OpenAI API's range is [0, 2]
_MAX_LIMIT: Final = 1 << 40

FinishReason = Literal["stop", "length"]


class ParameterError(ProtocolError):
    """A refused request field; `param` names it as the client wrote it (`messages[2].role`)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(code, message)
        self.param = param


@dataclass(frozen=True, slots=True)
class GenerationLimits:
    """Bounds on one generative request, checked before anything is allocated for it.

    max_body_bytes: bytes of the JSON request body.
    max_new_tokens: the largest `max_tokens` a request may ask for (the server's limit);
        also the default for a chat completion that names none.
    max_messages: chat messages per request.
    max_content_parts: text parts in one message's content list.
    max_prompt_chars: characters of prompt text over the whole request (every message's
        content, or the completion prompt); the engine bounds tokens on top of this.
    max_stop_chars: characters in one stop sequence.
    max_name_length: characters of a model name or of `user`.
    max_top_k: the largest top_k (vocabularies are smaller; the engine clamps).
    """

    max_body_bytes: int = 4 << 20
    max_new_tokens: int = 4096
    max_messages: int = 512
    max_content_parts: int = 64
    max_prompt_chars: int = 1 << 20
    max_stop_chars: int = 256
    max_name_length: int = 256
    max_top_k: int = 1 << 20

    def __post_init__(self) -> None:
        """Refuse incoherent configuration early: limits are trusted, but must be sane."""
        for name in self.__slots__:
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= _MAX_LIMIT:
                raise ValueError(f"GenerationLimits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to generate: the complete, resolved settings of one request.

    temperature 0 (or top_k 1) means greedy decoding (then the other settings and the
    seed change nothing); top_k 0 means "no top-k filter"; seed None means "the engine
    picks one". `stop` holds up to four non-empty strings; generation ends before the
    first one to appear.

    The parsers (`parse_sampling`) refuse out-of-range fields with a `ParameterError` naming
    the field; `__post_init__` holds the same invariants for values built in code, so an
    engine given any `SamplingParams` never sees NaN, a negative seed or an empty stop
    string (a `ValueError`: a bug of the caller, not a client's mistake).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        def number(value: object) -> bool:
            return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]

        if type(self.max_tokens) is not int or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if not (number(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}]")
        if not (number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        if type(self.top_k) is not int or self.top_k < 0:
            raise ValueError("top_k must be a non-negative int")
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an int from 0 to {MAX_SEED}")
        if (
            not isinstance(self.stop, tuple)
            or len(self.stop) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in self.stop)
        ):
            raise ValueError(
                f"stop must be a tuple of at most {MAX_STOP_SEQUENCES} non-empty strings"
            )

    @property
    def greedy(self) -> bool:
        """Whether decoding is deterministic argmax (temperature 0, or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

    def as_dict(self) -> dict[str, Any]:
        """The canonical JSON-ready form (for receipts and logs of settings, never text)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
        }


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one generation (the prompt as the model saw it, template included)."""

    prompt_tokens: int
    completion_tokens: int

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Usage.{name} must be a non-negative int, got {value!r}")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# --------------------------------------------------------------------------- fields


def require_object(value: object, what: str, param: str | None = None) -> dict[str, Any]:
    """`value` as a JSON object, or an invalid_request / invalid_parameter refusal."""
    if not isinstance(value, dict):
        code = "invalid_request" if param is None else "invalid_parameter"
        raise ParameterError(code, f"{what} must be a JSON object", param)
    return value


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def text(value: object, param: str, *, max_chars: int, allow_empty: bool = True) -> str:
    """A bounded string of valid Unicode; the message never quotes the string itself."""
    if not isinstance(value, str):
        raise ParameterError(
            "invalid_parameter", f"{param} must be a string, not {_type_name(value)}", param
        )
    if len(value) > max_chars:
        raise ParameterError(
            "invalid_parameter", f"{param} is longer than {max_chars} characters", param
        )
    if not value and not allow_empty:
        raise ParameterError("invalid_parameter", f"{param} must not be empty", param)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ParameterError(
                "invalid_parameter", f"{param} is not valid Unicode (a lone surrogate)", param
            ) from exc
    return value


def optional_str(doc: Mapping[str, Any], key: str, param: str, *, max_chars: int) -> str | None:
    value = doc.get(key)
    return None if value is None else text(value, param, max_chars=max_chars)


def optional_bool(doc: Mapping[str, Any], key: str, param: str) -> bool | None:
    value = doc.get(key)
    if value is None or type(value) is bool:
        return value
    raise ParameterError(
        "invalid_parameter", f"{param} must be true or false, not {_type_name(value)}", param
    )


def optional_int(
    doc: Mapping[str, Any], key: str, param: str, *, low: int, high: int
) -> int | None:
    """An exact JSON integer (no bool, no 1.0) within [low, high], or None if absent."""
    value = doc.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise ParameterError(
            "invalid_parameter", f"{param} must be an integer, not {_type_name(value)}", param
        )
    if not low <= value <= high:
        raise ParameterError(
            "invalid_parameter",
            f"{param} must be between {low} and {high}, got {shown(value)}",
            param,
        )
    return value


def optional_float(
    doc: Mapping[str, Any],
    key: str,
    param: str,
    *,
    low: float,
    high: float,
    low_open: bool = False,
) -> float | None:
    """A finite JSON number (no bool) within [low, high] (or (low, high]), or None."""
    value = doc.get(key)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise ParameterError(
            "invalid_parameter", f"{param} must be a number, not {_type_name(value)}", param
        )
    # compare before converting: float() of an int past 2**1024 raises OverflowError, and
    # Python compares ints with floats exactly
    above_low = value > low if low_open else value >= low
    if not (above_low and value <= high and math.isfinite(value)):
        opening = "(" if low_open else "["
        raise ParameterError(
            "invalid_parameter",
            f"{param} must be in {opening}{low:g}, {high:g}], got {shown(value)}",
            param,
        )
    return float(value)


def _stop(value: object, param: str, limits: GenerationLimits) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ParameterError(
            "invalid_parameter", f"{param} must be a string or a list of strings", param
        )
    if len(items) > MAX_STOP_SEQUENCES:
        raise ParameterError(
            "invalid_parameter",
            f"{param} holds {len(items)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
            param,
        )
    single = isinstance(value, str)
    return tuple(
        text(
            item,
            param if single else f"{param}[{i}]",
            max_chars=limits.max_stop_chars,
            allow_empty=False,
        )
        for i, item in enumerate(items)
    )


def parse_sampling(
    doc: Mapping[str, Any],
    limits: GenerationLimits,
    *,
    default_max_tokens: int,
    prefix: str = "",
    max_tokens_keys: tuple[str, ...] = ("max_tokens",),
) -> SamplingParams:
    """The sampling fields of `doc` (temperature, top_p, top_k, seed, stop, max tokens).

    `prefix` is prepended to parameter names in refusals (`parameters.` for OIP).
    With several `max_tokens_keys` (OpenAI chat: `max_completion_tokens`, `max_tokens`),
    any of them may be given, and if more than one is, they must agree.
    `default_max_tokens` applies when none is given; it is capped at the server limit.
    A `max_tokens` above `limits.max_new_tokens` is refused, never silently lowered.
    """
    chosen: int | None = None
    for key in max_tokens_keys:
        value = optional_int(doc, key, prefix + key, low=1, high=limits.max_new_tokens)
        if value is not None:
            if chosen is not None and value != chosen:
                names = " and ".join(prefix + k for k in max_tokens_keys)
                raise ParameterError(
                    "invalid_parameter", f"{names} disagree; give one of them", prefix + key
                )
            chosen = value
    temperature = optional_float(
        doc, "temperature", prefix + "temperature", low=0.0, high=MAX_TEMPERATURE
    )
    top_p = optional_float(doc, "top_p", prefix + "top_p", low=0.0, high=1.0, low_open=True)
    top_k = optional_int(doc, "top_k", prefix + "top_k", low=0, high=limits.max_top_k)
    seed = optional_int(doc, "seed", prefix + "seed", low=0, high=MAX_SEED)
    return SamplingParams(
        max_tokens=chosen if chosen is not None else min(default_max_tokens, limits.max_new_tokens),
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None else top_k,
        seed=seed,
        stop=_stop(doc.get("stop"), prefix + "stop", limits),
    )
