"""The OIP generate extension (Triton's /generate and /generate_stream) wire format."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from blindinfer.errors import ProtocolError
from blindinfer.protocol.generation import (
    ERROR_CODES,
    GenerationLimits,
    ParameterError,
    SamplingParams,
    Usage,
)
from blindinfer.protocol.inference import encode_error
from blindinfer.protocol.oip_generate import (
    DEFAULT_MAX_TOKENS,
    GenerateRequest,
    error_body,
    error_event,
    generate_response,
    parse_generate_request,
    stream_end,
    stream_text,
)
from blindinfer.protocol.openai_requests import parse_chat_completion_request

LIMITS = GenerationLimits()


def generate(
    doc: object, *, streaming: bool = False, limits: GenerationLimits = LIMITS
) -> GenerateRequest:
    return parse_generate_request(json.dumps(doc).encode(), limits, streaming=streaming)


def with_params(**params: Any) -> GenerateRequest:
    return generate({"text_input": "Hello", "parameters": params})


def refused(parse: Callable[[], object], code: str, param: str | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse()
    assert info.value.code == code, info.value
    if param is not None:
        assert isinstance(info.value, ParameterError) and info.value.param == param
        assert param in info.value.message
    return info.value


def test_the_triton_example_request_parses() -> None:
    body = b'{"text_input": "client input", "parameters": {"stream": false, "temperature": 0}}'
    request = parse_generate_request(body, LIMITS, streaming=False)
    assert request == GenerateRequest(
        "client input", SamplingParams(max_tokens=DEFAULT_MAX_TOKENS, temperature=0.0), False
    )


def test_every_parameter_is_parsed_exactly() -> None:
    request = generate(
        {
            "text_input": "x",
            "parameters": {
                "max_tokens": 12,
                "temperature": 0.7,
                "top_p": 0.95,
                "top_k": 50,
                "seed": 1234,
                "stop": ["\n\n", "###"],
                "stream": True,
            },
        },
        streaming=True,
    )
    assert request == GenerateRequest(
        "x", SamplingParams(12, 0.7, 0.95, 50, 1234, ("\n\n", "###")), True
    )


def test_parameters_are_optional_and_stream_follows_the_route() -> None:
    assert generate({"text_input": "x"}).sampling == SamplingParams(max_tokens=16)
    assert generate({"text_input": "x", "parameters": None}).stream is False
    assert generate({"text_input": "x", "parameters": {}}, streaming=True).stream is True


def test_stream_must_agree_with_the_route() -> None:
    error = refused(
        lambda: generate({"text_input": "x", "parameters": {"stream": True}}),
        "invalid_parameter",
        "parameters.stream",
    )
    assert "/generate_stream" in error.message
    refused(
        lambda: generate({"text_input": "x", "parameters": {"stream": False}}, streaming=True),
        "invalid_parameter",
        "parameters.stream",
    )
    refused(lambda: with_params(stream=1), "invalid_parameter", "parameters.stream")


def test_sampling_is_the_same_as_the_openai_apis() -> None:
    """One SamplingParams parser: the same settings give the same value on both APIs."""
    settings_ = {
        "max_tokens": 7,
        "temperature": 1.5,
        "top_p": 0.25,
        "top_k": 2,
        "seed": 9,
        "stop": "z",
    }
    chat_body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], **settings_}
    ).encode()
    assert (
        with_params(**settings_).sampling
        == parse_chat_completion_request(chat_body, LIMITS).sampling
    )


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"max_tokens": True}, "parameters.max_tokens"),
        ({"max_tokens": 0}, "parameters.max_tokens"),
        ({"max_tokens": LIMITS.max_new_tokens + 1}, "parameters.max_tokens"),
        ({"max_tokens": "16"}, "parameters.max_tokens"),
        ({"temperature": False}, "parameters.temperature"),
        ({"temperature": 3}, "parameters.temperature"),
        ({"top_p": 0}, "parameters.top_p"),
        ({"top_k": -1}, "parameters.top_k"),
        ({"top_k": True}, "parameters.top_k"),
        ({"seed": -5}, "parameters.seed"),
        ({"seed": True}, "parameters.seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "parameters.stop"),
        ({"stop": [""]}, "parameters.stop[0]"),
        ({"stop": ""}, "parameters.stop"),
    ],
)
def test_a_bad_parameter_is_refused_by_name(params: dict[str, Any], param: str) -> None:
    refused(lambda: with_params(**params), "invalid_parameter", param)


@pytest.mark.parametrize(
    "name",
    ["stop_words", "bad_words", "end_id", "repetition_penalty", "exclude_input_in_output", "n"],
)
def test_an_unknown_parameter_is_refused_not_ignored(name: str) -> None:
    refused(lambda: with_params(**{name: 1}), "unknown_parameter", "parameters." + name)
    refused(lambda: with_params(**{name: None}), "unknown_parameter", "parameters." + name)


@pytest.mark.parametrize("name", ["max_tokens", "id", "sampling_parameters", "input_ids", "stream"])
def test_an_unknown_top_level_member_is_refused(name: str) -> None:
    """Triton would pass it to the model as a tensor; blindinfer has no such inputs."""
    refused(lambda: generate({"text_input": "x", name: 1}), "unknown_parameter", name)


@pytest.mark.parametrize(
    ("doc", "code", "param"),
    [
        ({}, "invalid_request", "text_input"),
        ({"text_input": None}, "invalid_request", "text_input"),
        ({"text_input": ""}, "invalid_parameter", "text_input"),
        ({"text_input": 3}, "invalid_parameter", "text_input"),
        ({"text_input": ["x"]}, "invalid_parameter", "text_input"),
        ({"text_input": "\ud800"}, "invalid_parameter", "text_input"),
        ({"text_input": "x", "parameters": []}, "invalid_parameter", "parameters"),
        ({"text_input": "x", "parameters": "max_tokens=3"}, "invalid_parameter", "parameters"),
        ([], "invalid_request", None),
    ],
)
def test_a_bad_request_is_refused(doc: object, code: str, param: str | None) -> None:
    refused(lambda: generate(doc), code, param)


@pytest.mark.parametrize(
    "body",
    [
        b'{"text_input": "x", "text_input": "y"}',
        b'{"text_input": "x", "parameters": {"temperature": NaN}}',
        b'{"text_input": "x", "parameters": {"top_p": Infinity}}',
        b'{"text_input": "x", "parameters": {"temperature": 1e999}}',
        b'{"text_input": "\xff"}',
        b"",
    ],
)
def test_malformed_json_is_refused(body: bytes) -> None:
    refused(lambda: parse_generate_request(body, LIMITS, streaming=False), "malformed_json")


def test_size_and_prompt_are_bounded() -> None:
    small = GenerationLimits(max_body_bytes=40, max_prompt_chars=5)
    refused(lambda: generate({"text_input": "x" * 40}, limits=small), "request_too_large")
    refused(
        lambda: generate({"text_input": "abcdef"}, limits=small), "prompt_too_large", "text_input"
    )
    assert generate({"text_input": "abcde"}, limits=small).text_input == "abcde"


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=12,
)
_params = st.dictionaries(
    st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "x"]),
    _json | st.integers(0, 20) | st.floats(0, 2),
    max_size=4,
)


def _check(body: bytes) -> None:
    for streaming in (False, True):
        try:
            request = parse_generate_request(body, LIMITS, streaming=streaming)
        except ProtocolError as exc:
            assert exc.code in ERROR_CODES, exc  # noqa: PT017
            continue
        assert request.text_input and request.stream is streaming
        assert 1 <= request.sampling.max_tokens <= LIMITS.max_new_tokens


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=120))
def test_any_bytes_parse_or_are_refused_with_a_code(body: bytes) -> None:
    _check(body)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_input=st.text(max_size=10) | _json, params=_params | _json)
def test_any_request_shaped_json_parses_or_is_refused_with_a_code(
    text_input: object, params: object
) -> None:
    _check(json.dumps({"text_input": text_input, "parameters": params}).encode())


# --------------------------------------------------------------------------- responses


def test_the_response_has_tritons_members_and_ours() -> None:
    body = generate_response(
        model_name="m",
        model_version="1",
        text_output="out",
        finish_reason="length",
        usage=Usage(4, 16),
    )
    assert body == (
        b'{"model_name":"m","model_version":"1","text_output":"out","finish_reason":"length",'
        b'"prompt_tokens":4,"completion_tokens":16}'
    )


def test_a_stream_renders_exact_bytes_with_no_done() -> None:
    stream = (
        stream_text(model_name="m", model_version="1", text_output="Hel")
        + stream_text(model_name="m", model_version="1", text_output="lo\n")
        + stream_end(model_name="m", model_version="1", finish_reason="stop", usage=Usage(2, 2))
    )
    assert stream == (
        b'data: {"model_name":"m","model_version":"1","text_output":"Hel"}\n\n'
        b'data: {"model_name":"m","model_version":"1","text_output":"lo\\n"}\n\n'
        b'data: {"model_name":"m","model_version":"1","text_output":"","finish_reason":"stop",'
        b'"prompt_tokens":2,"completion_tokens":2}\n\n'
    )
    events = [json.loads(e.data) for e in SSEDecoder().iter_bytes(iter([stream]))]
    assert "".join(e["text_output"] for e in events) == "Hello\n"


def test_a_bad_finish_reason_is_a_server_bug() -> None:
    with pytest.raises(ValueError, match="finish_reason"):
        stream_end(model_name="m", model_version="1", finish_reason="eos", usage=Usage(0, 0))  # type: ignore[arg-type]


def test_errors_are_the_oip_error_body() -> None:
    assert error_body("unknown_model", "no such model") == encode_error(
        "unknown_model", "no such model"
    )
    assert error_event("model_crashed", "x") == b'data: {"error":"x","code":"model_crashed"}\n\n'
