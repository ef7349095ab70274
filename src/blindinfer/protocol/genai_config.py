"""`genai_config.json`, the untrusted configuration of an onnxruntime-genai model, parsed once.

onnxruntime-genai reads its whole run configuration from this file, next to the model. Read
as-is, a model's author would choose things that belong to the server: execution providers
and devices (`session_options.provider_options`), thread counts and spinning, a profiling
output path (`enable_profiling`), EP-context file paths, a shared library to load
(`custom_ops_library`), other model files anywhere on disk (`filename` of the decoder,
encoders, pipelines), and, through the KV-cache name templates, a printf format string:
og composes `past_key_values.%d.key` with `snprintf(buf, 64, template, layer)`, so a
template holding `%s` or `%n` is memory corruption in the worker.

So the server never hands the model's file to onnxruntime-genai. `parse_genai_config` turns
it into a frozen `GenaiConfig` holding only what the server understands, each value typed and
bounded; `render` writes the canonical `genai_config.json` the worker uses, from that object
plus the server's own session options. The decisions:

- Strict JSON (`strict_json.loads` without NaN/Infinity): UTF-8, no duplicate keys (two
  parsers could read two configs), at most MAX_CONFIG_BYTES (64 KiB; builder output is ~2 KB).
- The decoder's `session_options` are the server's: dropped, and listed in
  `GenaiConfig.ignored` (the builder always writes one, with the provider it built for, so
  refusing it would refuse every model built for a GPU). One option in it is refused instead:
  `custom_ops_library`, a shared library to load (the server loads no code from a model, and
  a graph that needs custom ops would otherwise fail or run differently). The top-level
  `engine` (batching and KV-cache memory, the server's) is refused, not dropped: og 0.18's
  builder writes it only for paged-attention exports (`dynamic_batching`), which blindinfer
  does not serve yet, and a model may not size the server's memory.
- Every other key must be known, or the config is refused naming it: a model that needs a
  setting we do not carry (vision or speech sections, pipelines, speculative decoding,
  recurrent-state groups) would otherwise run differently from what its author built.
- Bounds: context length, vocabulary, layers, heads, head size by `ConfigLimits` (the server
  passes its own); token ids inside the vocabulary; the decoder's `filename` a flat `.onnx`
  name accepted by the archive rules (and, when the folder's names are given, one of them:
  the runtime passes only the folder's regular files, so never a link); tensor names of
  letters, digits and `_.:/-`, at most 48 characters, name templates (`*_names`) exactly one
  `%d` and no other `%`, short enough for og's 64-byte buffer; search defaults finite and in
  range, `max_length` at most the context, no beam search (`num_beams`,
  `num_return_sequences` 1), `batch_size` bounded.

Errors are `GenaiConfigError` (a `ProtocolError`, HTTP 400 "invalid_genai_config") whose
message names the key (`model.decoder.filename`) and what is wrong; `key` holds the path.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from blindinfer.errors import ProtocolError
from blindinfer.protocol import strict_json
from blindinfer.protocol.model_archive import (
    MAX_CONFIG_BYTES,
    ModelArchiveError,
    check_entry_name,
)
from blindinfer.protocol.shown import shown

__all__ = [
    "ERROR_CODE",
    "KV_DTYPE_BYTES",
    "ConfigLimits",
    "DecoderConfig",
    "GenaiConfig",
    "GenaiConfigError",
    "SearchDefaults",
    "SlidingWindow",
    "parse_genai_config",
    "render",
]

ERROR_CODE: Final = "invalid_genai_config"
_INT_MAX: Final = (1 << 31) - 1  # og reads these into C++ int
KV_DTYPE_BYTES: Final = 4
"""Bytes of one KV-cache element as `DecoderConfig.kv_bytes_per_token` counts them (fp32)."""
_KV_NAME_BUFFER: Final = 64  # og's ComposeKeyValueName buffer, NUL included
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_.:/\-]+\Z")
_MAP_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
_MODEL_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")

_MAX_TENSOR_NAME: Final = 48  # real names are under 30 characters
_TOP_KEYS: Final = frozenset({"model", "search"})
_TOP_REFUSED: Final = {
    "engine": "is the server's to choose (batching and KV-cache memory); a model may not set it"
}
_CUSTOM_OPS: Final = "custom_ops_library"
_TOKEN_KEYS: Final = (
    "bos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "bot_token_id",
    "eot_token_id",
    "bor_token_id",
    "eor_token_id",
)
_MODEL_KEYS: Final = frozenset(
    {"type", "context_length", "vocab_size", "eos_token_id", "decoder", *_TOKEN_KEYS}
)
_DECODER_SIZES: Final = (
    "head_size",
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
)
_DECODER_KEYS: Final = frozenset(
    {"filename", "inputs", "outputs", "sliding_window", *_DECODER_SIZES}
)
_DECODER_SERVER_OWNED: Final = frozenset({"session_options"})
_WINDOW_KEYS: Final = frozenset(
    {
        "window_size",
        "pad_value",
        "alignment",
        "slide_key_value_cache",
        "slide_inputs",
        "layers",
        "cache_slack",
    }
)
_SEARCH_BOOLS: Final = ("do_sample", "early_stopping", "past_present_share_buffer")
_SEARCH_FLOATS: Final = {
    # key: (low, high): finite, inclusive
    "temperature": (0.0, 100.0),
    "top_p": (0.0, 1.0),
    "repetition_penalty": (1e-6, 100.0),
    "length_penalty": (-100.0, 100.0),
    "diversity_penalty": (-100.0, 100.0),
}
_SEARCH_INTS: Final = (
    "min_length",
    "max_length",
    "top_k",
    "no_repeat_ngram_size",
    "batch_size",
    "num_beams",
    "num_return_sequences",
    "random_seed",
    "chunk_size",
)


class GenaiConfigError(ProtocolError):
    """A genai_config.json that blindinfer will not run; `key` is the offending path."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(ERROR_CODE, f"genai_config.json {key}: {message}")


@dataclass(frozen=True, slots=True)
class ConfigLimits:
    """Bounds on what a model's config may declare (the server passes its own).

    max_context_length bounds the context (and so each request's KV cache); max_batch_size
    the config's `search.batch_size`; the rest are sanity bounds on the architecture, far
    above real models, that keep every size product inside og's int arithmetic."""

    max_context_length: int = 1 << 17
    max_batch_size: int = 64
    max_vocab_size: int = 1 << 22
    max_layers: int = 1024
    max_heads: int = 1024
    max_head_size: int = 1024
    max_hidden_size: int = 1 << 16

    def __post_init__(self) -> None:
        """Limits are trusted, but must be positive ints within og's int."""
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= _INT_MAX:
                raise ValueError(f"ConfigLimits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, slots=True)
class SlidingWindow:
    """og's sliding-window attention settings (local-attention layers)."""

    window_size: int
    pad_value: int | None = None
    alignment: Literal["left", "right"] | None = None
    slide_key_value_cache: bool | None = None
    slide_inputs: bool | None = None
    layers: tuple[int, ...] | None = None
    cache_slack: int | None = None


@dataclass(frozen=True, slots=True)
class DecoderConfig:
    """The decoder: its file in the folder, its shape, and its graph's tensor names."""

    filename: str
    num_hidden_layers: int
    num_key_value_heads: int
    head_size: int
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    inputs: tuple[tuple[str, str], ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()
    sliding_window: SlidingWindow | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """The KV cache one token of one sequence holds: a key and a value per layer, each
        `num_key_value_heads * head_size` elements of KV_DTYPE_BYTES. The config does not say
        the cache's element type (the builder picks fp32 for CPU, fp16 for GPU exports), so
        this counts fp32, the widest og uses: never less than the cache really takes. A
        sliding window only makes the real cache smaller. Bounded by `ConfigLimits` (at most
        1024 * 2 * 1024 * 1024 * 4 bytes), so always a plain, exact int."""
        return (
            self.num_hidden_layers
            * 2
            * self.num_key_value_heads
            * self.head_size
            * (KV_DTYPE_BYTES)
        )


@dataclass(frozen=True, slots=True)
class SearchDefaults:
    """The config's `search` section: only the keys it set (None = og's default)."""

    values: tuple[tuple[str, bool | int | float], ...] = ()

    def get(self, key: str) -> bool | int | float | None:
        return dict(self.values).get(key)


@dataclass(frozen=True, slots=True)
class GenaiConfig:
    """What the server needs from a model's genai_config.json, checked and bounded."""

    model_type: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    decoder: DecoderConfig
    token_ids: tuple[tuple[str, int], ...] = ()
    """bos/pad and the other special token ids the config named, as (key, id)."""
    search: SearchDefaults = field(default_factory=SearchDefaults)
    ignored: tuple[str, ...] = ()
    """Server-owned settings the config held and the server dropped (key paths)."""

    @property
    def bos_token_id(self) -> int | None:
        return dict(self.token_ids).get("bos_token_id")

    @property
    def pad_token_id(self) -> int | None:
        return dict(self.token_ids).get("pad_token_id")

    @property
    def max_length(self) -> int:
        """The default total length (prompt + generated): the config's, else the context."""
        value = self.search.get("max_length")
        return value if isinstance(value, int) and value > 0 else self.context_length


def _object(value: object, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GenaiConfigError(key, f"must be a JSON object, got {shown(value)}")
    return value


def _int(value: object, key: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise GenaiConfigError(key, f"must be an integer from {low} to {high}, got {shown(value)}")
    return value


def _bool(value: object, key: str) -> bool:
    if type(value) is not bool:
        raise GenaiConfigError(key, f"must be true or false, got {shown(value)}")
    return value


def _float(value: object, key: str, low: float, high: float) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise GenaiConfigError(key, f"must be a finite number, got {shown(value)}")
    number = float(value)  # type: ignore[arg-type]
    if not low <= number <= high:
        raise GenaiConfigError(key, f"must be from {low} to {high}, got {shown(value)}")
    return number


def _known(doc: Mapping[str, Any], path: str, known: Collection[str], why: str) -> None:
    for key in doc:
        if key not in known:
            raise GenaiConfigError(f"{path}.{key}" if path else key, why)


_UNKNOWN = (
    "is not a setting blindinfer passes to onnxruntime-genai (blindinfer serves decoder-only "
    "text models; a setting it does not carry would make the model run differently from how "
    "it was built)"
)


def _tensor_names(value: object, key: str, layers: int) -> tuple[tuple[str, str], ...]:
    names = _object(value, key)
    out: list[tuple[str, str]] = []
    for name, graph_name in names.items():
        where = f"{key}.{name}"
        if not _MAP_KEY.match(name):
            raise GenaiConfigError(where, "is not a tensor role name")
        if not isinstance(graph_name, str) or not graph_name:
            raise GenaiConfigError(where, f"must be a tensor name, got {shown(graph_name)}")
        template = name.endswith("_names")
        bare = graph_name.replace("%d", "", 1) if template else graph_name
        if template and bare == graph_name:
            raise GenaiConfigError(where, "a name template must contain '%d' (the layer index)")
        if not _TENSOR_NAME.match(bare):
            raise GenaiConfigError(
                where,
                "tensor names are letters, digits and '_.:/-'"
                + (" with exactly one '%d' (og formats it with printf)" if template else ""),
            )
        longest = len(bare) + len(str(max(layers - 1, 0))) if template else len(graph_name)
        if longest >= _KV_NAME_BUFFER or len(graph_name) > _MAX_TENSOR_NAME:
            raise GenaiConfigError(
                where, f"names longer than {_MAX_TENSOR_NAME} characters are not accepted"
            )
        out.append((name, graph_name))
    return tuple(sorted(out))


def _window(value: object, key: str, context: int, layers: int) -> SlidingWindow:
    doc = _object(value, key)
    _known(doc, key, _WINDOW_KEYS, _UNKNOWN)
    if "window_size" not in doc:
        raise GenaiConfigError(f"{key}.window_size", "is required")
    alignment = doc.get("alignment")
    if alignment not in (None, "left", "right"):
        raise GenaiConfigError(f"{key}.alignment", "must be 'left' or 'right'")
    layer_list = doc.get("layers")
    if layer_list is not None:
        if not isinstance(layer_list, list) or len(layer_list) > layers:
            raise GenaiConfigError(f"{key}.layers", f"must be a list of at most {layers} layers")
        layer_list = tuple(_int(i, f"{key}.layers", 0, layers - 1) for i in layer_list)

    def opt_bool(name: str) -> bool | None:
        return None if doc.get(name) is None else _bool(doc[name], f"{key}.{name}")

    return SlidingWindow(
        window_size=_int(doc["window_size"], f"{key}.window_size", 1, context),
        pad_value=None
        if doc.get("pad_value") is None
        else _int(doc["pad_value"], f"{key}.pad_value", -_INT_MAX, _INT_MAX),
        alignment=alignment,
        slide_key_value_cache=opt_bool("slide_key_value_cache"),
        slide_inputs=opt_bool("slide_inputs"),
        layers=layer_list,
        cache_slack=None
        if doc.get("cache_slack") is None
        else _int(doc["cache_slack"], f"{key}.cache_slack", 0, context),
    )


def _decoder(
    value: object,
    limits: ConfigLimits,
    context: int,
    entries: Collection[str] | None,
    ignored: list[str],
) -> DecoderConfig:
    key = "model.decoder"
    doc = _object(value, key)
    for name in doc:
        if name in _DECODER_SERVER_OWNED:
            ignored.append(f"{key}.{name}")
    options = doc.get("session_options")
    if isinstance(options, dict) and _CUSTOM_OPS in options:
        raise GenaiConfigError(
            f"{key}.session_options.{_CUSTOM_OPS}",
            "names a shared library to load; blindinfer loads no code from a model",
        )
    _known(doc, key, _DECODER_KEYS | _DECODER_SERVER_OWNED, _UNKNOWN)
    filename = doc.get("filename")
    if not isinstance(filename, str):
        raise GenaiConfigError(f"{key}.filename", f"must be a file name, got {shown(filename)}")
    try:
        check_entry_name(filename)
    except ModelArchiveError as exc:
        raise GenaiConfigError(f"{key}.filename", exc.detail) from None
    if not filename.endswith(".onnx"):
        raise GenaiConfigError(f"{key}.filename", "must name a .onnx file of the folder")
    if entries is not None and filename not in entries:
        raise GenaiConfigError(
            f"{key}.filename", f"names {shown(filename)}, which is not a file of the model folder"
        )
    bounds = {
        "num_hidden_layers": limits.max_layers,
        "num_key_value_heads": limits.max_heads,
        "num_attention_heads": limits.max_heads,
        "head_size": limits.max_head_size,
        "hidden_size": limits.max_hidden_size,
    }
    sizes: dict[str, int | None] = {}
    for name in _DECODER_SIZES:
        if name in doc:
            sizes[name] = _int(doc[name], f"{key}.{name}", 1, bounds[name])
        elif name in ("num_hidden_layers", "num_key_value_heads", "head_size"):
            raise GenaiConfigError(f"{key}.{name}", "is required (it sizes the KV cache)")
        else:
            sizes[name] = None
    layers = sizes["num_hidden_layers"]
    assert layers is not None
    heads, kv_heads = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise GenaiConfigError(f"{key}.num_key_value_heads", "must divide num_attention_heads")
    return DecoderConfig(
        filename=filename,
        num_hidden_layers=layers,
        num_key_value_heads=sizes["num_key_value_heads"] or 1,
        head_size=sizes["head_size"] or 1,
        hidden_size=sizes["hidden_size"],
        num_attention_heads=heads,
        inputs=_tensor_names(doc.get("inputs", {}), f"{key}.inputs", layers),
        outputs=_tensor_names(doc.get("outputs", {}), f"{key}.outputs", layers),
        sliding_window=None
        if doc.get("sliding_window") is None
        else _window(doc["sliding_window"], f"{key}.sliding_window", context, layers),
    )


def _search(value: object, limits: ConfigLimits, context: int, vocab: int) -> SearchDefaults:
    doc = _object(value, "search")
    _known(doc, "search", {*_SEARCH_BOOLS, *_SEARCH_FLOATS, *_SEARCH_INTS}, _UNKNOWN)
    ints = {
        "min_length": (0, context),
        "max_length": (0, context),  # og: 0 means the context length
        "top_k": (0, vocab),
        "no_repeat_ngram_size": (0, context),
        "batch_size": (1, limits.max_batch_size),
        "num_beams": (1, 1),  # beam search multiplies each request's KV cache
        "num_return_sequences": (1, 1),
        "random_seed": (-1, _INT_MAX),
        "chunk_size": (1, context),
    }
    values: list[tuple[str, bool | int | float]] = []
    for name in sorted(doc):
        item = doc[name]
        where = f"search.{name}"
        if name in _SEARCH_BOOLS:
            values.append((name, _bool(item, where)))
        elif name in _SEARCH_FLOATS:
            values.append((name, _float(item, where, *_SEARCH_FLOATS[name])))
        else:
            values.append((name, _int(item, where, *ints[name])))
    found = dict(values)
    low, high = found.get("min_length", 0), found.get("max_length", 0) or context
    if low > high:
        raise GenaiConfigError("search.min_length", "must not exceed max_length")
    return SearchDefaults(tuple(values))


def parse_genai_config(
    raw: bytes,
    *,
    entries: Collection[str] | None = None,
    limits: ConfigLimits | None = None,
) -> GenaiConfig:
    """Parse untrusted genai_config.json bytes; `entries` are the folder's file names (the
    decoder's file must be one of them). Raises GenaiConfigError only."""
    limits = limits or ConfigLimits()
    if len(raw) > MAX_CONFIG_BYTES:
        raise GenaiConfigError(
            "(file)", f"is {len(raw)} bytes, more than the limit of {MAX_CONFIG_BYTES}"
        )
    try:
        document = strict_json.loads(bytes(raw), allow_nan=False)
    except ProtocolError as exc:
        raise GenaiConfigError("(file)", exc.message) from None
    top = _object(document, "(file)")
    for name, why in _TOP_REFUSED.items():
        if name in top:
            raise GenaiConfigError(name, why)
    ignored: list[str] = []
    _known(top, "", _TOP_KEYS, _UNKNOWN)
    if "model" not in top:
        raise GenaiConfigError("model", "is required")
    model = _object(top["model"], "model")
    _known(model, "model", _MODEL_KEYS, _UNKNOWN)
    for name in ("type", "context_length", "vocab_size", "eos_token_id", "decoder"):
        if name not in model:
            raise GenaiConfigError(f"model.{name}", "is required")
    model_type = model["type"]
    if not isinstance(model_type, str) or not _MODEL_TYPE.match(model_type):
        raise GenaiConfigError(
            "model.type", f"must be an architecture name, got {shown(model_type)}"
        )
    context = _int(model["context_length"], "model.context_length", 1, limits.max_context_length)
    vocab = _int(model["vocab_size"], "model.vocab_size", 1, limits.max_vocab_size)
    eos = model["eos_token_id"]
    eos_list = eos if isinstance(eos, list) else [eos]
    if not 1 <= len(eos_list) <= 64:
        raise GenaiConfigError("model.eos_token_id", "must be a token id or 1 to 64 token ids")
    eos_ids = tuple(_int(e, "model.eos_token_id", 0, vocab - 1) for e in eos_list)
    token_ids = tuple(
        (name, _int(model[name], f"model.{name}", 0, vocab - 1))
        for name in _TOKEN_KEYS
        if model.get(name) is not None
    )
    decoder = _decoder(model["decoder"], limits, context, entries, ignored)
    search = _search(top.get("search", {}), limits, context, vocab)
    return GenaiConfig(
        model_type=model_type,
        context_length=context,
        vocab_size=vocab,
        eos_token_ids=eos_ids,
        decoder=decoder,
        token_ids=token_ids,
        search=search,
        ignored=tuple(sorted(ignored)),
    )


def session_options(
    *,
    intra_op_threads: int = 1,
    provider: Literal["cpu", "cuda"] = "cpu",
    gpu_mem_limit: int | None = None,
) -> dict[str, Any]:
    """The server's session options in genai_config form: its threads, no spinning (a
    spinning thread starves the other workers on a shared CPU), its provider, no paths.

    `gpu_mem_limit` (cuda only): the cap, in bytes, of onnxruntime's CUDA memory arena for
    this model, as onnxruntime's CUDA provider option of that name (a string in og's
    config, like all provider options)."""
    if type(intra_op_threads) is not int or not 1 <= intra_op_threads <= 1024:
        raise ValueError(f"intra_op_threads must be 1 to 1024, got {intra_op_threads!r}")
    if provider not in ("cpu", "cuda"):
        raise ValueError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
    if gpu_mem_limit is not None and (
        provider != "cuda" or type(gpu_mem_limit) is not int or gpu_mem_limit <= 0
    ):
        raise ValueError(f"gpu_mem_limit is a positive int for cuda, got {gpu_mem_limit!r}")
    cuda: dict[str, str] = {}
    if gpu_mem_limit is not None:
        cuda["gpu_mem_limit"] = str(gpu_mem_limit)
    return {
        "log_id": "blindinfer",
        "intra_op_num_threads": intra_op_threads,
        "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": "0",
        "session.inter_op.allow_spinning": "0",
        "provider_options": [] if provider == "cpu" else [{"cuda": cuda}],
    }


_NEUTRAL_SEARCH: Final = {
    "do_sample": False,
    "num_beams": 1,
    "num_return_sequences": 1,
    "min_length": 0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "diversity_penalty": 0.0,
    "early_stopping": True,
    "past_present_share_buffer": True,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
}


def render(
    config: GenaiConfig,
    *,
    intra_op_threads: int = 1,
    provider: Literal["cpu", "cuda"] = "cpu",
    gpu_mem_limit: int | None = None,
    max_length: int | None = None,
    neutral_search: bool = False,
) -> bytes:
    """The genai_config.json the worker hands onnxruntime-genai: the parsed model, the
    server's session options, and the search defaults with `max_length` capped by the
    server's own limit when given. Deterministic (sorted keys).

    `neutral_search`: og's neutral search defaults instead of the model's (the runtime sets
    every request's sampling itself; a model's repetition penalty or n-gram ban would
    otherwise change even a greedy answer)."""
    decoder = config.decoder
    dec: dict[str, Any] = {
        "filename": decoder.filename,
        "head_size": decoder.head_size,
        "num_hidden_layers": decoder.num_hidden_layers,
        "num_key_value_heads": decoder.num_key_value_heads,
        "inputs": dict(decoder.inputs),
        "outputs": dict(decoder.outputs),
        "session_options": session_options(
            intra_op_threads=intra_op_threads, provider=provider, gpu_mem_limit=gpu_mem_limit
        ),
    }
    if decoder.hidden_size is not None:
        dec["hidden_size"] = decoder.hidden_size
    if decoder.num_attention_heads is not None:
        dec["num_attention_heads"] = decoder.num_attention_heads
    if decoder.sliding_window is not None:
        window = decoder.sliding_window
        dec["sliding_window"] = {
            name: (list(value) if isinstance(value, tuple) else value)
            for name in _WINDOW_KEYS
            if (value := getattr(window, name)) is not None
        }
    model: dict[str, Any] = {
        "type": config.model_type,
        "context_length": config.context_length,
        "vocab_size": config.vocab_size,
        "eos_token_id": config.eos_token_ids[0]
        if len(config.eos_token_ids) == 1
        else list(config.eos_token_ids),
        "decoder": dec,
        **dict(config.token_ids),
    }
    search: dict[str, Any] = dict(_NEUTRAL_SEARCH if neutral_search else config.search.values)
    length = config.context_length if neutral_search else config.max_length
    if max_length is not None:
        if type(max_length) is not int or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        length = min(length, max_length)
    search["max_length"] = length
    if search.get("min_length", 0) > length:
        search["min_length"] = 0
    document = {"model": model, "search": search}
    return json.dumps(document, indent=4, sort_keys=True, allow_nan=False).encode("ascii")
