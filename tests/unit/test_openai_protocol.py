"""The OpenAI-compatible wire format: strict request parsing, responses the SDK accepts.

Every response builder is checked against the official `openai` SDK's own types, and the
SDK itself is run, unmodified, against the parser and the stream renderer through an
in-memory transport (no network, no server): what the SDK sends parses, what we render
the SDK reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from blindinfer.errors import ProtocolError
from blindinfer.protocol import openai_requests, sse
from blindinfer.protocol.inference import _loads as oip_loads
from blindinfer.protocol.openai_api import (
    ERROR_CODES,
    ChatCompletionRequest,
    ChatCompletionStream,
    ChatMessage,
    CompletionRequest,
    CompletionStream,
    GenerationLimits,
    ParameterError,
    SamplingParams,
    Usage,
    chat_completion,
    error_body,
    error_event,
    error_type,
    new_id,
    parse_chat_completion_request,
    parse_completion_request,
    text_completion,
)

LIMITS = GenerationLimits()
USER = {"role": "user", "content": "hi"}


def _body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def chat(**fields: Any) -> ChatCompletionRequest:
    doc = {"model": "m", "messages": [USER], **fields}
    return parse_chat_completion_request(_body(doc), LIMITS)


def completion(**fields: Any) -> CompletionRequest:
    doc = {"model": "m", "prompt": "Once", **fields}
    return parse_completion_request(_body(doc), LIMITS)


def refused(parse: Callable[[], object], code: str, param: str | None = None) -> ParameterError:
    with pytest.raises(ProtocolError) as info:
        parse()
    assert info.value.code == code, info.value
    if param is not None:
        assert isinstance(info.value, ParameterError)
        assert info.value.param == param
        assert param in info.value.message
    return info.value  # type: ignore[return-value]


# --------------------------------------------------------------------------- supported


def test_a_minimal_chat_request_gets_the_documented_defaults() -> None:
    request = chat()
    assert request == ChatCompletionRequest(
        model="m",
        messages=(ChatMessage("user", "hi"),),
        sampling=SamplingParams(max_tokens=LIMITS.max_new_tokens),
        stream=False,
        include_usage=False,
    )
    assert request.sampling == SamplingParams(
        max_tokens=4096, temperature=1.0, top_p=1.0, top_k=0, seed=None, stop=()
    )
    assert not request.sampling.greedy


def test_every_supported_chat_field_is_parsed_exactly() -> None:
    request = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "a"}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "b"}, {"type": "text", "text": "c"}],
            },
            {"role": "assistant", "content": ""},
        ],
        max_completion_tokens=7,
        temperature=0,
        top_p=0.5,
        top_k=40,
        seed=2**31 - 1,
        stop=["\n", "END"],
        stream=True,
        stream_options={"include_usage": True},
        user="someone",
    )
    assert request.messages == (
        ChatMessage("system", "be brief"),
        ChatMessage("developer", "a"),
        ChatMessage("user", "b\nc"),
        ChatMessage("assistant", ""),
    )
    assert request.sampling == SamplingParams(7, 0.0, 0.5, 40, 2**31 - 1, ("\n", "END"))
    assert request.sampling.greedy
    assert type(request.sampling.temperature) is float
    assert request.stream and request.include_usage


def test_max_tokens_and_max_completion_tokens_are_one_setting() -> None:
    assert chat(max_tokens=9).sampling.max_tokens == 9
    assert chat(max_tokens=9, max_completion_tokens=9).sampling.max_tokens == 9
    refused(lambda: chat(max_tokens=9, max_completion_tokens=8), "invalid_parameter", "max_tokens")


def test_greedy_is_temperature_zero_or_top_k_one() -> None:
    assert chat(temperature=0).sampling.greedy
    assert chat(top_k=1).sampling.greedy
    assert not chat(top_k=2, temperature=0.1).sampling.greedy
    assert chat(seed=5).sampling.as_dict() == {
        "max_tokens": LIMITS.max_new_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 5,
        "stop": [],
    }


def test_a_single_stop_string_is_one_sequence() -> None:
    assert chat(stop="###").sampling.stop == ("###",)
    assert chat(stop=None).sampling.stop == ()


def test_null_means_absent_for_optional_fields() -> None:
    request = chat(temperature=None, top_p=None, seed=None, stop=None, n=None, tools=None)
    assert request.sampling == SamplingParams(max_tokens=LIMITS.max_new_tokens)


def test_a_minimal_completion_request_gets_the_documented_defaults() -> None:
    assert completion() == CompletionRequest("m", "Once", SamplingParams(max_tokens=16))


def test_every_supported_completion_field_is_parsed_exactly() -> None:
    request = completion(
        prompt=["Once upon"],
        max_tokens=3,
        temperature=2,
        top_p=1,
        top_k=0,
        seed=0,
        stop="x",
        stream=True,
        stream_options={"include_usage": False},
        user="u",
    )
    assert request == CompletionRequest(
        "m", "Once upon", SamplingParams(3, 2.0, 1.0, 0, 0, ("x",)), True, False
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 1),
        ("presence_penalty", 0),
        ("presence_penalty", 0.0),
        ("frequency_penalty", 0),
        ("logit_bias", {}),
        ("logprobs", False),
        ("response_format", {"type": "text"}),
        ("tool_choice", "none"),
        ("store", False),
        ("modalities", ["text"]),
    ],
)
def test_a_chat_field_set_to_its_neutral_value_is_accepted(field: str, value: object) -> None:
    assert chat(**{field: value}).sampling == SamplingParams(max_tokens=LIMITS.max_new_tokens)


@pytest.mark.parametrize(
    ("field", "value"), [("n", 1), ("echo", False), ("best_of", 1), ("frequency_penalty", 0.0)]
)
def test_a_completion_field_set_to_its_neutral_value_is_accepted(field: str, value: object) -> None:
    assert completion(**{field: value}).prompt == "Once"


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 2),
        ("n", True),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tools", []),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("parallel_tool_calls", True),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"50256": -100}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("presence_penalty", False),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("store", True),
        ("metadata", {"a": "b"}),
        ("service_tier", "auto"),
        ("reasoning_effort", "low"),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
    ],
)
def test_an_unsupported_chat_field_is_refused_by_name(field: str, value: object) -> None:
    error = refused(lambda: chat(**{field: value}), "unsupported_parameter", field)
    assert "not supported" in error.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 3),
        ("echo", True),
        ("best_of", 2),
        ("suffix", "end"),
        ("logprobs", 0),
        ("logit_bias", {"1": 1}),
        ("presence_penalty", 1),
    ],
)
def test_an_unsupported_completion_field_is_refused_by_name(field: str, value: object) -> None:
    refused(lambda: completion(**{field: value}), "unsupported_parameter", field)


@pytest.mark.parametrize("field", ["min_p", "repetition_penalty", "max_token", "Temperature"])
def test_an_unknown_field_is_refused_even_when_null(field: str) -> None:
    refused(lambda: chat(**{field: 1}), "unknown_parameter", field)
    refused(lambda: chat(**{field: None}), "unknown_parameter", field)
    refused(lambda: completion(**{field: 1}), "unknown_parameter", field)


def test_chat_only_and_completion_only_fields_are_unknown_on_the_other_endpoint() -> None:
    refused(lambda: completion(max_completion_tokens=3), "unknown_parameter")
    refused(lambda: completion(messages=[USER]), "unknown_parameter", "messages")
    refused(lambda: chat(prompt="x"), "unknown_parameter", "prompt")
    refused(lambda: chat(echo=False), "unknown_parameter", "echo")


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ({"role": "tool", "content": "x", "tool_call_id": "1"}, "unsupported_parameter", None),
        ({"role": "tool", "content": "x"}, "unsupported_parameter", "messages[0].role"),
        ({"role": "function", "content": "x"}, "unsupported_parameter", "messages[0].role"),
        ({"role": "robot", "content": "x"}, "invalid_parameter", "messages[0].role"),
        ({"role": 1, "content": "x"}, "invalid_parameter", "messages[0].role"),
        ({"content": "x"}, "invalid_parameter", "messages[0].role"),
        ({"role": "user"}, "invalid_parameter", "messages[0].content"),
        ({"role": "user", "content": None}, "invalid_parameter", "messages[0].content"),
        ({"role": "user", "content": 5}, "invalid_parameter", "messages[0].content"),
        ({"role": "user", "content": []}, "invalid_parameter", "messages[0].content"),
        (
            {"role": "user", "content": "x", "name": "bob"},
            "unsupported_parameter",
            "messages[0].name",
        ),
        (
            {"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]},
            "unsupported_parameter",
            "messages[0].tool_calls",
        ),
        (
            {"role": "user", "content": "x", "colour": "red"},
            "unknown_parameter",
            "messages[0].colour",
        ),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "unsupported_parameter",
            "messages[0].content[0].type",
        ),
        (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            "unsupported_parameter",
            "messages[0].content[0].type",
        ),
        (
            {"role": "user", "content": [{"type": "txt", "text": "x"}]},
            "invalid_parameter",
            "messages[0].content[0].type",
        ),
        (
            {"role": "user", "content": [{"type": "text"}]},
            "invalid_parameter",
            "messages[0].content[0].text",
        ),
        (
            {"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}]},
            "unknown_parameter",
            "messages[0].content[0].cache",
        ),
        ({"role": "user", "content": ["x"]}, "invalid_parameter", "messages[0].content[0]"),
        ("hello", "invalid_parameter", "messages[0]"),
    ],
)
def test_a_bad_or_unsupported_message_is_refused_by_path(
    message: object, code: str, param: str | None
) -> None:
    refused(lambda: chat(messages=[message]), code, param)


@pytest.mark.parametrize(
    ("prompt", "code", "param"),
    [
        ([1, 2, 3], "unsupported_parameter", "prompt"),
        ([[1, 2], [3]], "unsupported_parameter", "prompt"),
        (["a", "b"], "unsupported_parameter", "prompt"),
        ([], "invalid_parameter", "prompt"),
        ("", "invalid_parameter", "prompt"),
        ([""], "invalid_parameter", "prompt[0]"),
        ([5.0], "invalid_parameter", "prompt[0]"),
        (7, "invalid_parameter", "prompt"),
        ({"text": "x"}, "invalid_parameter", "prompt"),
    ],
)
def test_a_prompt_that_is_not_one_text_is_refused(prompt: object, code: str, param: str) -> None:
    refused(lambda: completion(prompt=prompt), code, param)


def test_token_id_prompts_say_to_send_text() -> None:
    assert (
        "send the prompt as text"
        in refused(lambda: completion(prompt=[1]), "unsupported_parameter").message
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", True),
        ("temperature", "0.5"),
        ("temperature", -0.1),
        ("temperature", 2.0001),
        ("temperature", 10**400),
        ("top_p", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", False),
        ("top_k", -1),
        ("top_k", 1.0),
        ("top_k", True),
        ("top_k", LIMITS.max_top_k + 1),
        ("seed", -1),
        ("seed", 2**31),
        ("seed", 1.5),
        ("seed", False),
        ("seed", "42"),
        ("max_tokens", 0),
        ("max_tokens", LIMITS.max_new_tokens + 1),
        ("max_tokens", True),
        ("max_tokens", 16.0),
        ("max_completion_tokens", 10**30),
        ("stream", 1),
        ("stream", "true"),
        ("stop", 5),
        ("stop", ["a", 1]),
        ("stop", ""),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", ["x" * (LIMITS.max_stop_chars + 1)]),
        ("stop", {"a": 1}),
        ("user", 5),
        ("user", "u" * (LIMITS.max_name_length + 1)),
        ("model", ""),
        ("model", 3),
        ("model", "m" * (LIMITS.max_name_length + 1)),
        ("messages", []),
        ("messages", {"role": "user"}),
        ("stream_options", {"include_usage": True}),  # without stream: true
    ],
)
def test_a_bad_value_is_refused_by_name(field: str, value: object) -> None:
    error = refused(lambda: chat(**{field: value}), "invalid_parameter")
    assert error.param is not None and error.param.split("[")[0] == field


def test_bool_is_never_a_number() -> None:
    """Python's bool is an int: True must not pass as 1 anywhere a number is expected."""
    for field in ("max_tokens", "top_k", "seed", "temperature", "top_p"):
        refused(lambda: chat(**{field: True}), "invalid_parameter", field)  # noqa: B023
        refused(lambda: completion(**{field: False}), "invalid_parameter", field)  # noqa: B023
    refused(lambda: chat(n=True), "unsupported_parameter", "n")
    refused(lambda: completion(best_of=True), "unsupported_parameter", "best_of")


def test_stream_options_are_checked() -> None:
    refused(
        lambda: chat(stream=True, stream_options={"include_usage": 1}),
        "invalid_parameter",
        "stream_options.include_usage",
    )
    refused(
        lambda: chat(stream=True, stream_options={"continuous_usage_stats": True}),
        "unknown_parameter",
        "stream_options.continuous_usage_stats",
    )
    refused(
        lambda: chat(stream=True, stream_options={"include_obfuscation": True}),
        "unsupported_parameter",
        "stream_options.include_obfuscation",
    )
    refused(lambda: chat(stream=True, stream_options=[]), "invalid_parameter", "stream_options")
    assert chat(stream=True, stream_options={"include_obfuscation": False}).include_usage is False
    assert chat(stream=False, stream_options=None).stream is False


def test_missing_required_fields_are_named() -> None:
    refused(
        lambda: parse_chat_completion_request(b'{"messages": []}', LIMITS),
        "invalid_request",
        "model",
    )
    refused(
        lambda: parse_chat_completion_request(b'{"model": "m"}', LIMITS),
        "invalid_request",
        "messages",
    )
    refused(
        lambda: parse_completion_request(b'{"model": "m"}', LIMITS), "invalid_request", "prompt"
    )


# --------------------------------------------------------------------------- strict JSON


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "model": "n", "messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "m", "messages": [{"role": "user", "role": "system", "content": "x"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": -Infinity}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}]} {}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}]',
        b"\xff\xfe{}",
        b'{"model": "m", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
        b"{1: 2}",
        b'{"seed": ' + b"9" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b"",
    ],
)
def test_malformed_json_is_refused(body: bytes) -> None:
    refused(lambda: parse_chat_completion_request(body, LIMITS), "malformed_json")


def test_the_oip_codec_still_accepts_nan_for_float_tensors() -> None:
    """One loader, two policies: the tensor codec keeps NaN (module doc of inference.py)."""
    value = oip_loads(b"[NaN, 1e400]")
    assert isinstance(value, list) and value[0] != value[0] and value[1] == float("inf")


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"3", b"null", b"true"])
def test_a_body_that_is_not_an_object_is_refused(body: bytes) -> None:
    refused(lambda: parse_chat_completion_request(body, LIMITS), "invalid_request")
    refused(lambda: parse_completion_request(body, LIMITS), "invalid_request")


def test_a_lone_surrogate_is_refused_and_not_quoted() -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "secret \\ud800"}]}'
    error = refused(
        lambda: parse_chat_completion_request(body, LIMITS),
        "invalid_parameter",
        "messages[0].content",
    )
    assert "secret" not in error.message
    refused(lambda: completion(prompt="\ud800"), "invalid_parameter", "prompt")
    refused(lambda: chat(model="\udfff"), "invalid_parameter", "model")


# --------------------------------------------------------------------------- bounds


def test_the_body_size_is_bounded_before_parsing() -> None:
    limits = GenerationLimits(max_body_bytes=64)
    body = _body({"model": "m", "messages": [{"role": "user", "content": "x" * 64}]})
    refused(lambda: parse_chat_completion_request(body, limits), "request_too_large")
    refused(lambda: parse_completion_request(b"{" * 65, limits), "request_too_large")


def test_message_count_parts_and_prompt_characters_are_bounded() -> None:
    limits = GenerationLimits(max_messages=3, max_content_parts=2, max_prompt_chars=10)

    def parse(messages: object) -> ChatCompletionRequest:
        return parse_chat_completion_request(_body({"model": "m", "messages": messages}), limits)

    assert len(parse([USER] * 3).messages) == 3
    refused(lambda: parse([USER] * 4), "prompt_too_large", "messages")
    part = {"type": "text", "text": "a"}
    assert parse([{"role": "user", "content": [part, part]}]).messages[0].content == "a\na"
    refused(
        lambda: parse([{"role": "user", "content": [part] * 3}]),
        "prompt_too_large",
        "messages[0].content",
    )
    assert parse([{"role": "user", "content": "x" * 10}]).messages[0].content == "x" * 10
    refused(lambda: parse([{"role": "user", "content": "x" * 11}]), "prompt_too_large")
    # the bound is over the whole request, not per message
    refused(
        lambda: parse([{"role": "user", "content": "x" * 6}, {"role": "user", "content": "y" * 5}]),
        "prompt_too_large",
        "messages[1].content",
    )
    refused(
        lambda: parse([{"role": "user", "content": [{"type": "text", "text": "x" * 11}]}]),
        "prompt_too_large",
        "messages[0].content[0].text",
    )
    prompt_limits = GenerationLimits(max_prompt_chars=4)
    refused(
        lambda: parse_completion_request(_body({"model": "m", "prompt": "abcde"}), prompt_limits),
        "prompt_too_large",
        "prompt",
    )


def test_max_tokens_is_bounded_by_the_server_limit_not_lowered() -> None:
    limits = GenerationLimits(max_new_tokens=8)
    body = _body({"model": "m", "messages": [USER]})
    assert parse_chat_completion_request(body, limits).sampling.max_tokens == 8
    body = _body({"model": "m", "prompt": "x"})
    assert parse_completion_request(body, limits).sampling.max_tokens == 8  # 16 > limit
    body = _body({"model": "m", "messages": [USER], "max_tokens": 9})
    error = refused(lambda: parse_chat_completion_request(body, limits), "invalid_parameter")
    assert "between 1 and 8" in error.message


def test_generation_limits_refuse_nonsense() -> None:
    for bad in (0, -1, True, 1.5, 1 << 41):
        with pytest.raises(ValueError, match="max_new_tokens"):
            GenerationLimits(max_new_tokens=bad)  # type: ignore[arg-type]


def test_usage_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        Usage(-1, 0)
    with pytest.raises(ValueError, match="completion_tokens"):
        Usage(0, True)


# --------------------------------------------------------------------------- fuzzing

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
_fields = st.sampled_from(
    sorted(
        openai_requests._CHAT_SUPPORTED
        | openai_requests._COMPLETION_SUPPORTED
        | set(openai_requests._CHAT_UNSUPPORTED)
        | set(openai_requests._COMPLETION_UNSUPPORTED)
    )
)
_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"])},
        optional={
            "content": st.text(max_size=20)
            | st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["text", "image_url"])}, optional={"text": _json}
                ),
                max_size=3,
            )
            | _json,
            "name": _json,
        },
    ),
    max_size=3,
)
_requests = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=8) | _json,
        "messages": _messages | _json,
        "prompt": st.text(max_size=8) | st.lists(st.text(max_size=4), max_size=2) | _json,
    },
).flatmap(
    lambda base: st.dictionaries(_fields, _json, max_size=5).map(lambda extra: {**base, **extra})
)

_PARSERS = (parse_chat_completion_request, parse_completion_request)

# mostly valid requests with plausible, sometimes out-of-range settings: reaches acceptance
_settings = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(-1, LIMITS.max_new_tokens + 1) | st.booleans(),
        "temperature": st.floats(-0.5, 2.5) | st.integers(0, 3) | st.booleans(),
        "top_p": st.floats(0, 1.5) | st.integers(0, 1),
        "top_k": st.integers(-1, 100) | st.floats(0, 5),
        "seed": st.integers(-1, 2**32) | st.none(),
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5) | st.none(),
        "stream": st.booleans() | st.none(),
        "n": st.integers(0, 2),
        "presence_penalty": st.floats(-1, 1) | st.just(0),
        "user": st.text(max_size=5),
    },
)
_valid_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer"]),
        "content": st.text(max_size=20)
        | st.lists(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
            min_size=1,
            max_size=3,
        ),
    }
)
_plausible = st.tuples(
    st.text(min_size=1, max_size=8),
    st.lists(_valid_message, min_size=1, max_size=3),
    st.text(max_size=20) | st.lists(st.text(max_size=8), min_size=1, max_size=1),
    _settings,
)


def _outcome(parse: Callable[[bytes, GenerationLimits], object], body: bytes) -> object:
    """The parsed request, or the ProtocolError it was refused with (nothing else escapes)."""
    try:
        return parse(body, LIMITS)
    except ProtocolError as exc:
        return exc


def _parse_or_refuse(body: bytes) -> None:
    for parse in _PARSERS:
        outcome = _outcome(parse, body)
        if isinstance(outcome, ProtocolError):
            assert outcome.code in ERROR_CODES, outcome


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_with_a_code(body: bytes) -> None:
    _parse_or_refuse(body)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_json)
def test_any_json_value_parses_or_is_refused_with_a_code(value: object) -> None:
    _parse_or_refuse(json.dumps(value).encode())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_requests)
def test_any_request_shaped_document_parses_or_is_refused_with_a_code(doc: dict[str, Any]) -> None:
    body = json.dumps(doc).encode()
    for parse in _PARSERS:
        request = _outcome(parse, body)
        if isinstance(request, ProtocolError):
            assert request.code in ERROR_CODES, request
            if request.code in {"unsupported_parameter", "unknown_parameter", "invalid_parameter"}:
                assert isinstance(request, ParameterError) and request.param
            continue
        assert isinstance(request, ChatCompletionRequest | CompletionRequest)
        # an accepted request holds only the typed, bounded values
        sampling = request.sampling
        assert 1 <= sampling.max_tokens <= LIMITS.max_new_tokens
        assert type(sampling.temperature) is float and 0 <= sampling.temperature <= 2
        assert type(sampling.top_p) is float and 0 < sampling.top_p <= 1
        assert type(sampling.top_k) is int and sampling.top_k >= 0
        assert len(sampling.stop) <= 4 and all(isinstance(s, str) and s for s in sampling.stop)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_plausible)
def test_plausible_requests_parse_to_exactly_what_they_say(
    request: tuple[str, list[dict[str, Any]], str | list[str], dict[str, Any]],
) -> None:
    model, messages, prompt, fields = request
    bodies = (
        (parse_chat_completion_request, {"model": model, "messages": messages, **fields}),
        (parse_completion_request, {"model": model, "prompt": prompt, **fields}),
    )
    for parse, doc in bodies:
        outcome = _outcome(parse, json.dumps(doc).encode())
        if isinstance(outcome, ProtocolError):
            assert outcome.code in ERROR_CODES, outcome
            assert isinstance(outcome, ParameterError) and outcome.param, outcome
            continue
        assert isinstance(outcome, ChatCompletionRequest | CompletionRequest)
        sampling = outcome.sampling
        if fields.get("temperature") is not None:
            assert sampling.temperature == fields["temperature"]
        if fields.get("max_tokens") is not None:
            assert sampling.max_tokens == fields["max_tokens"]
        if fields.get("seed") is not None:
            assert sampling.seed == fields["seed"]
        if isinstance(fields.get("stop"), str):
            assert sampling.stop == (fields["stop"],)
        elif fields.get("stop") is not None:
            assert sampling.stop == tuple(fields["stop"])
        assert outcome.stream is bool(fields.get("stream"))
        assert fields.get("n") in (None, 1) and fields.get("presence_penalty") in (None, 0)


# --------------------------------------------------------------------------- responses


def test_chat_completion_is_a_valid_sdk_chat_completion() -> None:
    body = chat_completion(
        id="chatcmpl-1",
        created=7,
        model="m",
        content="héllo\n",
        finish_reason="length",
        usage=Usage(3, 4),
    )
    parsed = ChatCompletion.model_validate_json(body)
    assert parsed.id == "chatcmpl-1" and parsed.object == "chat.completion" and parsed.created == 7
    assert parsed.choices[0].index == 0 and parsed.choices[0].finish_reason == "length"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].message.content == "héllo\n"
    assert parsed.usage is not None
    assert (
        parsed.usage.prompt_tokens,
        parsed.usage.completion_tokens,
        parsed.usage.total_tokens,
    ) == (3, 4, 7)
    assert body == (
        b'{"id":"chatcmpl-1","object":"chat.completion","created":7,"model":"m","choices":'
        b'[{"index":0,"message":{"role":"assistant","content":"h\\u00e9llo\\n"},'
        b'"logprobs":null,"finish_reason":"length"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
    )


def test_text_completion_is_a_valid_sdk_completion() -> None:
    body = text_completion(
        id="cmpl-1", created=7, model="m", text="there", finish_reason="stop", usage=Usage(1, 1)
    )
    parsed = Completion.model_validate_json(body)
    assert parsed.object == "text_completion" and parsed.choices[0].text == "there"
    assert parsed.choices[0].finish_reason == "stop" and parsed.usage is not None
    assert parsed.usage.total_tokens == 2


def test_a_bad_finish_reason_is_a_server_bug() -> None:
    with pytest.raises(ValueError, match="finish_reason"):
        chat_completion(
            id="x",
            created=0,
            model="m",
            content="",
            finish_reason="eos",  # type: ignore[arg-type]
            usage=Usage(0, 0),
        )
    with pytest.raises(ValueError, match="finish_reason"):
        ChatCompletionStream("x", 0, "m").end("tool_calls", Usage(0, 0))  # type: ignore[arg-type]


def _events(stream: bytes) -> list[str]:
    """The data of each event, as the SDK's own SSE decoder reads it."""
    return [event.data for event in SSEDecoder().iter_bytes(iter([stream]))]


def test_a_chat_stream_renders_exact_bytes() -> None:
    renderer = ChatCompletionStream("chatcmpl-9", 5, "m", include_usage=True)
    stream = renderer.start() + renderer.text("Hi") + renderer.end("stop", Usage(2, 1))
    head = (
        b'data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":5,"model":"m",'
        b'"choices":'
    )
    assert stream == (
        head + b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        b'"finish_reason":null}],"usage":null}\n\n'
        + head
        + b'[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}],'
        b'"usage":null}\n\n'
        + head
        + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n'
        + head
        + b'[],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}\n\n'
        b"data: [DONE]\n\n"
    )


def test_a_chat_stream_without_usage_has_no_usage_member() -> None:
    renderer = ChatCompletionStream("c", 1, "m")
    stream = renderer.start() + renderer.text("a") + renderer.end("length", Usage(1, 1))
    datas = _events(stream)
    assert datas[-1] == "[DONE]" and len(datas) == 4
    for data in datas[:-1]:
        doc = json.loads(data)
        assert "usage" not in doc
        chunk = ChatCompletionChunk.model_validate(doc)
        assert chunk.choices[0].index == 0
    assert json.loads(datas[-2])["choices"][0]["finish_reason"] == "length"


def test_every_chat_chunk_is_a_valid_sdk_chunk() -> None:
    renderer = ChatCompletionStream("c", 1, "m", include_usage=True)
    stream = renderer.start() + renderer.text("x") + renderer.end("stop", Usage(1, 1))
    chunks = [ChatCompletionChunk.model_validate_json(d) for d in _events(stream)[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].delta.content == "x"
    assert chunks[2].choices[0].finish_reason == "stop"
    assert chunks[3].choices == [] and chunks[3].usage is not None
    assert chunks[3].usage.total_tokens == 2
    assert all(chunk.usage is None for chunk in chunks[:3])


def test_a_completion_stream_renders_sdk_shaped_chunks() -> None:
    renderer = CompletionStream("cmpl-2", 3, "m", include_usage=True)
    stream = renderer.text("ab") + renderer.end("stop", Usage(4, 1))
    datas = _events(stream)
    assert datas[-1] == "[DONE]" and len(datas) == 4
    first = json.loads(datas[0])
    assert first == {
        "id": "cmpl-2",
        "object": "text_completion",
        "created": 3,
        "model": "m",
        "choices": [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": None}],
        "usage": None,
    }
    # OpenAI itself sends finish_reason null until the end; the SDK's Completion type
    # requires it, and the SDK builds stream chunks without validation (see the round trip)
    last = Completion.model_validate_json(datas[1])
    assert last.choices[0].finish_reason == "stop" and last.choices[0].text == ""
    usage = Completion.model_validate_json(datas[2])
    assert usage.choices == [] and usage.usage is not None and usage.usage.prompt_tokens == 4


def test_model_output_cannot_forge_events() -> None:
    """Text with newlines, `data: [DONE]` and raw bytes stays inside one event."""
    renderer = ChatCompletionStream("c", 1, "m")
    evil = "\n\ndata: [DONE]\n\r\n\u2028\x00é"
    stream = renderer.text(evil)
    assert stream.count(b"\n") == 2 and stream.endswith(b"\n\n") and stream.isascii()
    datas = _events(stream)
    assert len(datas) == 1
    assert json.loads(datas[0])["choices"][0]["delta"]["content"] == evil


def test_response_ids_are_fresh() -> None:
    ids = {new_id("chatcmpl-") for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("chatcmpl-") and len(i) == 33 for i in ids)


# --------------------------------------------------------------------------- errors


def test_errors_have_the_openai_shape_and_our_code() -> None:
    body = error_body(400, "unsupported_parameter", "n is not supported", "n")
    assert json.loads(body) == {
        "error": {
            "message": "n is not supported",
            "type": "invalid_request_error",
            "param": "n",
            "code": "unsupported_parameter",
        }
    }
    assert json.loads(error_body(404, "unknown_model", "no such model"))["error"]["param"] is None
    assert error_type(401) == "authentication_error"
    assert error_type(429) == "rate_limit_error"
    assert error_type(503) == "server_error"
    assert error_type(418) == "invalid_request_error"


def test_a_stream_error_is_an_event_then_done() -> None:
    datas = _events(error_event(504, "inference_timeout", "too slow"))
    assert datas == [
        '{"error":{"message":"too slow","type":"server_error","param":null,'
        '"code":"inference_timeout"}}',
        "[DONE]",
    ]


# --------------------------------------------------------------------------- the SDK itself


def _sdk(handler: Callable[[httpx2.Request], httpx2.Response]) -> openai.OpenAI:
    transport = httpx2.MockTransport(handler)
    return openai.OpenAI(
        api_key="unused",
        base_url="http://blindinfer.invalid/v1",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def test_the_sdk_streams_a_chat_completion_we_parse_and_render() -> None:
    seen: list[ChatCompletionRequest] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/chat/completions"
        parsed = parse_chat_completion_request(request.content, LIMITS)
        seen.append(parsed)
        renderer = ChatCompletionStream("chatcmpl-1", 1, parsed.model, parsed.include_usage)
        body = (
            renderer.start()
            + renderer.text("Hel")
            + renderer.text("lo")
            + renderer.end("stop", Usage(5, 2))
        )
        return httpx2.Response(200, content=body, headers=dict(sse.HEADERS))

    client = _sdk(handler)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            temperature=0,
            top_p=0.9,
            seed=11,
            max_completion_tokens=5,
            stop=["\n"],
            extra_body={"top_k": 3},
        )
    )
    assert seen == [
        ChatCompletionRequest(
            "tiny",
            (ChatMessage("system", "s"), ChatMessage("user", "hi")),
            SamplingParams(5, 0.0, 0.9, 3, 11, ("\n",)),
            stream=True,
            include_usage=True,
        )
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7


def test_the_sdk_reads_a_completion_and_its_stream() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        parsed = parse_completion_request(request.content, LIMITS)
        if parsed.stream:
            renderer = CompletionStream("cmpl-1", 1, parsed.model)
            body = renderer.text("a") + renderer.text("b") + renderer.end("length", Usage(1, 2))
            return httpx2.Response(200, content=body, headers=dict(sse.HEADERS))
        body = text_completion(
            id="cmpl-1",
            created=1,
            model=parsed.model,
            text=parsed.prompt[::-1],
            finish_reason="stop",
            usage=Usage(1, 1),
        )
        return httpx2.Response(200, content=body, headers={"Content-Type": "application/json"})

    client = _sdk(handler)
    done = client.completions.create(model="m", prompt="xyz", max_tokens=3)
    assert done.choices[0].text == "zyx" and done.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="m", prompt="xyz", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == "ab"
    assert streamed[-1].choices[0].finish_reason == "length"


def test_the_sdk_raises_our_refusal_with_its_code_and_param() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        try:
            parse_chat_completion_request(request.content, LIMITS)
        except ParameterError as exc:
            return httpx2.Response(
                400,
                content=error_body(400, exc.code, exc.message, exc.param),
                headers={"Content-Type": "application/json"},
            )
        raise AssertionError("the request should have been refused")

    client = _sdk(handler)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[USER], n=2)  # type: ignore[list-item]
    assert info.value.code == "unsupported_parameter" and info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[USER], logprobs=True)  # type: ignore[list-item]
    assert info.value.param == "logprobs"


def test_the_sdk_raises_an_error_sent_mid_stream() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        renderer = ChatCompletionStream("c", 1, "m")
        body = renderer.start() + error_event(422, "model_crashed", "the model crashed")
        return httpx2.Response(200, content=body, headers=dict(sse.HEADERS))

    stream = _sdk(handler).chat.completions.create(model="m", messages=[USER], stream=True)  # type: ignore[list-item]
    with pytest.raises(openai.APIError, match="the model crashed"):
        list(stream)
