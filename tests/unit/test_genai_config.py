"""genai_config.json as untrusted input: what a model may say, and what it may not choose.

BUILDER_CONFIG is what onnxruntime-genai 0.18.0's model builder wrote for a tiny Llama
(`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`); each attack edits a copy.
The rendered config was also loaded and run by onnxruntime-genai 0.18.0 (tiny model, greedy
generation) when this module was written; that check needs a built model, so it lives with
the generative end-to-end tests, not here.
"""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.errors import ProtocolError
from blindinfer.protocol.genai_config import (
    ConfigLimits,
    GenaiConfig,
    GenaiConfigError,
    parse_genai_config,
    render,
    session_options,
)
from blindinfer.protocol.model_archive import MAX_CONFIG_BYTES

ENTRIES = (
    "genai_config.json",
    "model.onnx",
    "model.onnx.data",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)

BUILDER_CONFIG: dict[str, Any] = {
    "model": {
        "bos_token_id": 1,
        "context_length": 128,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": "model.onnx",
            "head_size": 16,
            "hidden_size": 64,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
        },
        "eos_token_id": 2,
        "pad_token_id": 0,
        "type": "llama",
        "vocab_size": 288,
    },
    "search": {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": 128,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": True,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    },
}


def _raw(doc: object) -> bytes:
    return json.dumps(doc).encode()


def _edited(path: str, value: object) -> bytes:
    """BUILDER_CONFIG with `value` at dotted `path` (None value: the key removed)."""
    doc = copy.deepcopy(BUILDER_CONFIG)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last)
    else:
        node[last] = value
    return _raw(doc)


def _refused(raw: bytes, key: str, limits: ConfigLimits | None = None) -> GenaiConfigError:
    with pytest.raises(GenaiConfigError) as info:
        parse_genai_config(raw, entries=ENTRIES, limits=limits)
    assert info.value.key == key, info.value.message
    assert key in info.value.message
    return info.value


def test_builder_output_parses() -> None:
    config = parse_genai_config(_raw(BUILDER_CONFIG), entries=ENTRIES)
    assert (config.model_type, config.context_length, config.vocab_size) == ("llama", 128, 288)
    assert config.eos_token_ids == (2,)
    assert (config.bos_token_id, config.pad_token_id) == (1, 0)
    assert config.decoder.filename == "model.onnx"
    assert (config.decoder.num_hidden_layers, config.decoder.num_key_value_heads) == (2, 2)
    assert dict(config.decoder.inputs)["past_key_names"] == "past_key_values.%d.key"
    assert config.search.get("top_k") == 50
    assert config.max_length == 128
    assert config.ignored == ("model.decoder.session_options",)


def test_render_uses_the_servers_session_options_and_caps_max_length() -> None:
    config = parse_genai_config(_raw(BUILDER_CONFIG), entries=ENTRIES)
    rendered = json.loads(render(config, intra_op_threads=3, max_length=64))
    options = rendered["model"]["decoder"]["session_options"]
    assert options == session_options(intra_op_threads=3)
    assert options["session.intra_op.allow_spinning"] == "0"
    assert rendered["search"]["max_length"] == 64
    assert rendered["model"]["decoder"]["inputs"] == BUILDER_CONFIG["model"]["decoder"]["inputs"]
    again = parse_genai_config(render(config), entries=ENTRIES)
    assert again.decoder == config.decoder
    assert again.search == config.search
    assert render(again) == render(config)  # canonical


def test_render_cuda_provider_is_the_servers_choice() -> None:
    config = parse_genai_config(_raw(BUILDER_CONFIG))
    options = json.loads(render(config, provider="cuda"))["model"]["decoder"]["session_options"]
    assert options["provider_options"] == [{"cuda": {}}]
    with pytest.raises(ValueError, match="intra_op_threads"):
        render(config, intra_op_threads=0)


# -- what a model may not choose ----------------------------------------------------------


HOSTILE_SESSION_OPTIONS: dict[str, Any] = {
    "provider_options": [
        {"cuda": {"device_id": "3"}},
        {"tensorrt": {"trt_engine_cache_path": "/"}},
    ],
    "intra_op_num_threads": 512,
    "inter_op_num_threads": 512,
    "session.intra_op.allow_spinning": "1",
    "enable_profiling": "/var/lib/blindinfer/store/profile",
    "ep_context_file_path": "/etc/passwd",
    "log_severity_level": 0,
}


def test_session_options_are_dropped_and_replaced() -> None:
    """Devices, threads, spinning, profiling and EP-context paths: none survives."""
    raw = _edited("model.decoder.session_options", HOSTILE_SESSION_OPTIONS)
    config = parse_genai_config(raw, entries=ENTRIES)
    assert "model.decoder.session_options" in config.ignored
    text = render(config).decode()
    for needle in ("/etc/passwd", "profile", "tensorrt", "device_id", "512"):
        assert needle not in text
    options = json.loads(text)["model"]["decoder"]["session_options"]
    assert options == session_options()


def test_a_library_to_load_is_refused_not_dropped() -> None:
    """og would dlopen it; a graph that needs custom ops cannot run without them either."""
    options = {**HOSTILE_SESSION_OPTIONS, "custom_ops_library": "/tmp/evil.so"}
    exc = _refused(
        _edited("model.decoder.session_options", options),
        "model.decoder.session_options.custom_ops_library",
    )
    assert "evil" not in exc.message


def test_engine_section_is_refused() -> None:
    """Batching and KV-cache memory are the server's: a model may not size them."""
    raw = _edited("engine", {"dynamic_batching": {"max_batch_size": 100000, "num_blocks": 10**9}})
    exc = _refused(raw, "engine")
    assert "server's" in exc.message


def test_neutral_search_replaces_the_models_defaults() -> None:
    """The runtime sets each request's sampling; a model's penalties must not change it."""
    doc = copy.deepcopy(BUILDER_CONFIG)
    doc["search"].update(repetition_penalty=1.3, no_repeat_ngram_size=2, min_length=20)
    config = parse_genai_config(_raw(doc), entries=ENTRIES)
    search = json.loads(render(config, max_length=64, neutral_search=True))["search"]
    assert (search["repetition_penalty"], search["no_repeat_ngram_size"]) == (1.0, 0)
    assert (search["min_length"], search["do_sample"], search["top_k"]) == (0, False, 0)
    assert search["max_length"] == 64
    assert json.loads(render(config, neutral_search=True))["search"]["max_length"] == 128


@pytest.mark.parametrize(
    ("filename", "fragment"),
    [
        ("../model.onnx", "escape"),
        ("/etc/passwd.onnx", "absolute"),
        ("sub/model.onnx", "flat"),
        ("..", "escape"),
        ("model.onnx.data", ".onnx"),
        ("libevil.so", "not a file of an onnxruntime-genai"),
        ("other.onnx", "not a file of the model folder"),
        ("", "empty"),
    ],
)
def test_decoder_filename_cannot_escape_the_folder(filename: str, fragment: str) -> None:
    exc = _refused(_edited("model.decoder.filename", filename), "model.decoder.filename")
    assert fragment in exc.message


def test_decoder_filename_must_be_a_string() -> None:
    _refused(_edited("model.decoder.filename", ["model.onnx"]), "model.decoder.filename")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("model.vision", {"filename": "/etc/passwd"}),
        ("model.speech", {"filename": "speech.onnx"}),
        ("model.encoder", {"filename": "encoder.onnx"}),
        ("model.embedding", {"filename": "embed.onnx"}),
        ("model.prompt_templates", {"user": "x"}),
        ("model.decoder.pipeline", [{"filename": "../../x.onnx"}]),
        ("model.decoder.state_groups", []),
        ("speculative", {"max_draft_tokens": 4}),
        ("search.unknown_knob", 1),
        ("model.decoder.sliding_window.custom", 1),
    ],
)
def test_unknown_settings_are_refused_not_dropped(path: str, value: object) -> None:
    raw = _edited(path, value)
    if path.startswith("model.decoder.sliding_window"):
        doc = json.loads(raw)
        doc["model"]["decoder"]["sliding_window"]["window_size"] = 16
        raw = _raw(doc)
    exc = _refused(raw, path)
    assert "decoder-only" in exc.message


# -- bounds -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [10**9, 1 << 31, 10**30, 0, -1, 1.5, "128", True, None])
def test_context_length_is_bounded(value: object) -> None:
    raw = _edited("model.context_length", value)
    _refused(raw, "model.context_length")


def test_context_length_bound_is_the_servers() -> None:
    limits = ConfigLimits(max_context_length=64)
    exc = _refused(_raw(BUILDER_CONFIG), "model.context_length", limits)
    assert "from 1 to 64" in exc.message


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("model.vocab_size", 1 << 40),
        ("model.eos_token_id", 288),
        ("model.eos_token_id", []),
        ("model.eos_token_id", list(range(65))),
        ("model.eos_token_id", -1),
        ("model.bos_token_id", 10**6),
        ("model.pad_token_id", "0"),
        ("model.type", "../llama"),
        ("model.type", 7),
        ("model.decoder.num_hidden_layers", 10**6),
        ("model.decoder.num_key_value_heads", 0),
        ("model.decoder.num_attention_heads", 3),  # not a multiple of the KV heads
        ("model.decoder.head_size", 1 << 20),
        ("model.decoder.hidden_size", 1 << 30),
        ("search.batch_size", 65),
        ("search.num_beams", 4),
        ("search.num_return_sequences", 2),
        ("search.max_length", 129),
        ("search.min_length", 200),
        ("search.top_p", 1.5),
        ("search.temperature", -1),
        ("search.repetition_penalty", 0),
        ("search.top_k", 10**6),
        ("search.do_sample", 1),
        ("search.random_seed", 1 << 40),
    ],
)
def test_values_are_bounded(path: str, value: object) -> None:
    key = path
    if path == "model.decoder.num_attention_heads":
        key = "model.decoder.num_key_value_heads"
    _refused(_edited(path, value), key)


@pytest.mark.parametrize(
    "missing",
    [
        "model.type",
        "model.context_length",
        "model.vocab_size",
        "model.eos_token_id",
        "model.decoder",
        "model.decoder.filename",
        "model.decoder.num_hidden_layers",
        "model.decoder.head_size",
    ],
)
def test_required_keys(missing: str) -> None:
    _refused(_edited(missing, None), missing)


def test_min_length_above_max_length() -> None:
    doc = copy.deepcopy(BUILDER_CONFIG)
    doc["search"].update(min_length=100, max_length=50)
    _refused(_raw(doc), "search.min_length")


def test_eos_list_and_sliding_window() -> None:
    doc = copy.deepcopy(BUILDER_CONFIG)
    doc["model"]["eos_token_id"] = [2, 3]
    doc["model"]["decoder"]["sliding_window"] = {
        "window_size": 64,
        "slide_key_value_cache": False,
        "slide_inputs": False,
        "layers": [0],
        "cache_slack": 0,
    }
    config = parse_genai_config(_raw(doc), entries=ENTRIES)
    assert config.eos_token_ids == (2, 3)
    rendered = json.loads(render(config))
    assert rendered["model"]["eos_token_id"] == [2, 3]
    assert (
        rendered["model"]["decoder"]["sliding_window"] == doc["model"]["decoder"]["sliding_window"]
    )
    doc["model"]["decoder"]["sliding_window"]["layers"] = [5]
    _refused(_raw(doc), "model.decoder.sliding_window.layers")
    doc["model"]["decoder"]["sliding_window"] = {"window_size": 4096}
    _refused(_raw(doc), "model.decoder.sliding_window.window_size")


# -- the printf template attack -----------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("past_key_names", "past_key_values.%s.key"),
        ("past_key_names", "past_key_values.%d.%n"),
        ("past_key_names", "%d%d"),
        ("past_key_names", "past_key_values.%x.key"),
        ("past_key_names", "past_key_values.key"),  # no layer index: every layer one name
        ("past_key_names", "p" * 62 + "%d"),  # overflows og's 64-byte buffer at layer 10+
        ("input_ids", "input_%d"),  # not a template
        ("input_ids", "in put"),
        ("input_ids", "i" * 49),  # longer than any real tensor name
        ("input_ids", ""),
        ("Input-Ids", "input_ids"),
    ],
)
def test_tensor_names_cannot_be_format_strings(key: str, value: str) -> None:
    doc = copy.deepcopy(BUILDER_CONFIG)
    doc["model"]["decoder"]["inputs"][key] = value
    doc["model"]["decoder"]["num_hidden_layers"] = 12
    _refused(_raw(doc), f"model.decoder.inputs.{key}")


# -- strict JSON -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": {}, "model": {}}',
        b'{"model": {"context_length": NaN}}',
        b'{"model": {"context_length": Infinity}}',
        b'{"search": {"temperature": 1e400}}',
        b"\xff\xfe{}",
        b"[]",
        b"",
        b"[" * 100_000,
        b'{"model": ' + b"9" * 5000 + b"}",
    ],
)
def test_malformed_json_is_refused(raw: bytes) -> None:
    with pytest.raises(GenaiConfigError):
        parse_genai_config(raw)


def test_size_bound_before_parsing() -> None:
    raw = _raw(BUILDER_CONFIG)
    padded = raw[:-1] + b" " * (MAX_CONFIG_BYTES - len(raw) + 1) + b"}"
    exc = _refused(padded, "(file)")
    assert str(MAX_CONFIG_BYTES) in exc.message


def test_a_config_error_is_a_400() -> None:
    from blindinfer.server.errors import status_and_code

    with pytest.raises(GenaiConfigError) as info:
        parse_genai_config(_edited("model.decoder.filename", "../x.onnx"))
    assert isinstance(info.value, ProtocolError)
    status, code, message = status_and_code(info.value)
    assert (status, code) == (400, "invalid_genai_config")
    assert message == "genai_config.json model.decoder.filename: '..' would escape the model folder"


# -- fuzzing -------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
_paths = st.sampled_from(
    [
        "model.type",
        "model.context_length",
        "model.vocab_size",
        "model.eos_token_id",
        "model.decoder",
        "model.decoder.filename",
        "model.decoder.inputs",
        "model.decoder.inputs.past_key_names",
        "model.decoder.sliding_window",
        "model.decoder.num_hidden_layers",
        "search",
        "search.max_length",
        "search.top_p",
        "model",
        "engine",
        "model.decoder.session_options",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(_paths, _json_values), max_size=3))
def test_fuzz_edited_configs_parse_or_are_refused(edits: list[tuple[str, object]]) -> None:
    doc = copy.deepcopy(BUILDER_CONFIG)
    for path, value in edits:
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            if not isinstance(node, dict):
                break
            node = node.setdefault(key, {})
        else:
            if isinstance(node, dict):
                node[last] = value
    try:
        raw = json.dumps(doc).encode()
    except ValueError:
        return
    try:
        config = parse_genai_config(raw, entries=ENTRIES)
    except GenaiConfigError:
        return
    assert isinstance(config, GenaiConfig)
    assert parse_genai_config(render(config), entries=ENTRIES).decoder == config.decoder


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300))
def test_fuzz_bytes(raw: bytes) -> None:
    with contextlib.suppress(GenaiConfigError):
        parse_genai_config(raw)
