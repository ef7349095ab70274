"""Token generation for onnxruntime-genai model folders, with the server's options.

A generative model is an onnxruntime-genai folder (`genai_config.json`, the ONNX decoder and
its external data, `tokenizer.json`, `tokenizer_config.json`, a chat template). Its
`genai_config.json` is untrusted: read as-is, onnxruntime-genai would let it pick the
execution providers and devices, thread counts, a profiling output path and even a shared
library to load (`session_options.custom_ops_library`). So the runtime never hands the
model's config to onnxruntime-genai. `sanitized_config` rebuilds it from an allow-list
(architecture and tensor names only), replaces every session option with the server's
(`RuntimeOptions`: threads, spinning off, CPU provider, no profiling, no custom ops) and the
search defaults with neutral ones; `GenerativeSession` loads the model from a private
staging folder holding that config and links to the model's other files, then removes it.

Generation (`GenerativeSession.generate`) takes token ids and `SamplingParams` and returns a
`Generation`: an iterator of `GeneratedToken` (id and the text it completes, decoded by
onnxruntime-genai's `TokenizerStream`), then `finish_reason` ("stop" or "length") and the
token counts. Bounds are checked before a KV cache exists: prompt + `max_tokens` must fit
the model's context and the server's limit (`ContextLengthError`). `Generation.close()`
stops a generation at once and frees its generator and KV cache (a client that went away).

Tokenization: `og.Tokenizer.encode` does not run the tokenizer's post-processor, so it never
adds BOS. That is the right thing for chat (`chat_prompt_ids`): a rendered chat template
already holds every special token the model expects, and adding BOS again would change the
prompt. Plain-text prompts (`encode`) are tokenized the same way, without special tokens;
a caller that wants BOS puts it in the text or the ids.

Batching (tried here with og 0.18 on the tiny test model): `og.Engine(model)` works on a
model loaded this way; in its default "static" mode it ran three requests in one batch
(max batch 4) with greedy tokens identical to `og.Generator`, and `Request.cancel_turn`
stopped one mid-stream (FinishReason.CANCELLED). But a per-request seed "requires an Engine
configured for dynamic batching", and dynamic batching needs a decoder exported with a
paged KV cache, which the builder's CPU export does not produce. So this module serves one
`og.Generator` per request (every parameter, seeds included, exact), and
`generative_batch.BatchedGenerator` runs a static Engine for requests without a seed (same
sanitized config, same `check` bounds first, the same `TokenText`); the server sends
seeded requests to a Generator until paged exports are available.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from blindinfer.runtime.errors import (
    ContextLengthError,
    GenerationRequestError,
    InvalidModelError,
)

CONFIG_NAME = "genai_config.json"
MAX_CONFIG_BYTES = 1 << 20

# What a decoder-only model's config may say: architecture and tensor names. Anything else
# (other model sections, run options, pipelines, engine settings) is refused, not dropped:
# a model that needs it would otherwise run differently from what its author built.
_MODEL_KEYS = frozenset(
    {"type", "bos_token_id", "eos_token_id", "pad_token_id", "context_length", "vocab_size",
     "decoder"}
)
_DECODER_KEYS = frozenset(
    {"session_options", "filename", "head_size", "hidden_size", "inputs", "outputs",
     "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "sliding_window"}
)
_NAME_MAPS = ("inputs", "outputs")
_MAX_CONTEXT = 1 << 20
_MAX_VOCAB = 1 << 22


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """What the server decides for every generative model, whatever its config says."""

    intra_op_threads: int = 1
    max_context_tokens: int = 4096  # prompt + generated tokens, per request
    max_new_tokens: int = 1024  # the largest max_tokens a request may ask for

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "max_context_tokens", "max_new_tokens"):
            if not _is_int(getattr(self, name), 1, _MAX_CONTEXT):
                raise ValueError(f"{name} must be a positive integer")

    def session_options(self) -> dict[str, Any]:
        """onnxruntime session options in genai_config form: threads fixed, no spinning
        (a spinning thread starves the other workers on a shared CPU), CPU only."""
        return {
            "log_id": "blindinfer",
            "intra_op_num_threads": self.intra_op_threads,
            "inter_op_num_threads": 1,
            "session.intra_op.allow_spinning": "0",
            "session.inter_op.allow_spinning": "0",
            "provider_options": [],
        }


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """One request's decoding parameters (OpenAI's names). temperature 0 is greedy;
    top_k 0 means no top-k cut; a seed makes sampling reproducible."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True, slots=True)
class GeneratedToken:
    """One generated token and the text it completes (may be "" while a multi-byte
    character or a possible stop string is still incomplete)."""

    token_id: int
    text: str


def _refuse(message: str) -> InvalidModelError:
    return InvalidModelError(f"genai_config.json: {message}")


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _tensor_name_ok(key: str, name: object) -> bool:
    """Printable names; a `*_names` template (og fills it with `snprintf(buf, 64, template,
    layer)`) holds exactly one `%d` and no other `%`: a `%s` or `%n` there would be memory
    corruption in the worker."""
    if not isinstance(name, str) or not name.isprintable() or not 0 < len(name) <= 48:
        return False
    if key.endswith("_names"):
        return name.count("%") == 1 and "%d" in name
    return "%" not in name


def _check_decoder(decoder: object, folder: Path) -> dict[str, Any]:
    if not isinstance(decoder, dict):
        raise _refuse("model.decoder must be an object")
    unknown = set(decoder) - _DECODER_KEYS
    if unknown:
        raise _refuse(f"unsupported decoder settings: {', '.join(sorted(unknown))}")
    filename = decoder.get("filename")
    if not isinstance(filename, str) or Path(filename).name != filename or filename in {
        "", ".", ".."
    }:
        raise _refuse("model.decoder.filename must be a plain file name")
    if not (folder / filename).is_file():
        raise _refuse("model.decoder.filename names no file of the folder")
    for key in ("head_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                "num_key_value_heads"):
        if key in decoder and not _is_int(decoder[key], 1, 1 << 16):
            raise _refuse(f"model.decoder.{key} must be a positive integer")
    for key in _NAME_MAPS:
        names = decoder.get(key, {})
        if not isinstance(names, dict) or not all(
            isinstance(k, str) and _tensor_name_ok(k, v) for k, v in names.items()
        ):
            raise _refuse(f"model.decoder.{key} must map names to tensor names")
    clean = {k: v for k, v in decoder.items() if k != "session_options"}
    return clean


def sanitized_config(folder: Path, options: RuntimeOptions) -> dict[str, Any]:
    """The config the server runs `folder` with: the model's architecture, the server's
    session options and neutral search defaults. Raises InvalidModelError."""
    path = folder / CONFIG_NAME
    try:
        raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except OSError:
        raise _refuse("missing or unreadable") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise _refuse("too large")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise _refuse("not valid JSON") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise _refuse("no model section")
    unknown = set(config) - {"model", "search"}
    if unknown:  # e.g. "engine": batching and cache sizes are the server's to choose
        raise _refuse(f"unsupported sections: {', '.join(sorted(unknown))}")
    model = config["model"]
    unknown = set(model) - _MODEL_KEYS
    if unknown:
        raise _refuse(f"unsupported model settings: {', '.join(sorted(unknown))}")
    if not isinstance(model.get("type"), str):
        raise _refuse("model.type must be a string")
    if not _is_int(model.get("context_length"), 1, _MAX_CONTEXT):
        raise _refuse(f"model.context_length must be an integer from 1 to {_MAX_CONTEXT}")
    if not _is_int(model.get("vocab_size"), 1, _MAX_VOCAB):
        raise _refuse(f"model.vocab_size must be an integer from 1 to {_MAX_VOCAB}")
    vocab = model["vocab_size"]
    eos = model.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos]
    if not eos_ids or not all(_is_int(e, 0, vocab - 1) for e in eos_ids):
        raise _refuse("model.eos_token_id must be token ids")
    for key in ("bos_token_id", "pad_token_id"):
        if key in model and not _is_int(model[key], 0, vocab - 1):
            raise _refuse(f"model.{key} must be a token id")
    decoder = _check_decoder(model.get("decoder"), folder)
    decoder["session_options"] = options.session_options()
    context = model["context_length"]
    return {
        "model": {**model, "decoder": decoder},
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "min_length": 0,
            "max_length": context, "repetition_penalty": 1.0, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
            "past_present_share_buffer": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
        },
    }


def _stage(folder: Path, config: Mapping[str, Any], parent: Path | None) -> Path:
    """A private folder with `config` and links to the model's other files (regular files
    only: a link or device in the model folder is refused, never followed)."""
    staging = Path(tempfile.mkdtemp(prefix="genai-", dir=parent))
    try:
        for entry in sorted(folder.iterdir()):
            if entry.name == CONFIG_NAME:
                continue
            if not stat.S_ISREG(entry.lstat().st_mode):
                raise _refuse("the model folder may hold only regular files")
            os.symlink(entry.resolve(), staging / entry.name)
        (staging / CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


class GenerativeSession:
    """One loaded onnxruntime-genai model and its tokenizer, run with the server's options.

    Thread-compatible like og itself: one Generation at a time per thread; several
    Generations may share the session.
    """

    def __init__(
        self, folder: Path, options: RuntimeOptions, *, staging_parent: Path | None = None
    ) -> None:
        import onnxruntime_genai as og

        self._og = og
        self.options = options
        self.config = sanitized_config(folder, options)
        model = self.config["model"]
        self.context_length: int = model["context_length"]
        self.vocab_size: int = model["vocab_size"]
        eos = model["eos_token_id"]
        self.eos_token_ids: frozenset[int] = frozenset(eos if isinstance(eos, list) else [eos])
        staging = _stage(folder, self.config, staging_parent)
        try:
            self._model = og.Model(str(staging))
            self._tokenizer = og.Tokenizer(self._model)
        except RuntimeError:
            # og's message can quote paths and file contents: keep it out of errors and logs
            raise InvalidModelError("onnxruntime-genai could not load the model") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @property
    def max_total_tokens(self) -> int:
        """The most tokens (prompt + generated) one request may hold."""
        return min(self.context_length, self.options.max_context_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text of `messages` through the model's chat template, ending with the
        assistant's turn."""
        try:
            text: str = self._tokenizer.apply_chat_template(
                json.dumps(list(map(dict, messages))), add_generation_prompt=True
            )
        except RuntimeError:
            raise GenerationRequestError(
                "invalid_messages", "the chat template could not render these messages"
            ) from None
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added (see the module docstring)."""
        return [int(t) for t in self._tokenizer.encode(text)]

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of the rendered chat prompt (it already holds BOS where the model's
        template puts it)."""
        return self.encode(self.render_chat(messages))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` exactly as a stream of them yields it. Not og's
        `Tokenizer.decode`: that one ends the text at a NUL byte and turns invalid UTF-8
        into U+FFFD, while the stream drops both; one decoding everywhere keeps a stream's
        text and a whole answer's text (and their digests in receipts) the same."""
        stream = self._tokenizer.create_stream()
        return "".join(stream.decode(int(t)) for t in ids)

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Refuse what cannot be generated within bounds, before anything is allocated."""
        if not prompt_ids:
            raise GenerationRequestError("empty_prompt", "the prompt has no tokens")
        if not all(_is_int(t, 0, self.vocab_size - 1) for t in prompt_ids):
            raise GenerationRequestError(
                "invalid_token_id", f"prompt token ids must be in [0, {self.vocab_size})"
            )
        if not _is_int(params.max_tokens, 1, self.options.max_new_tokens):
            raise GenerationRequestError(
                "invalid_max_tokens",
                f"max_tokens must be from 1 to {self.options.max_new_tokens}",
            )
        needed = len(prompt_ids) + params.max_tokens
        if needed > self.max_total_tokens:
            raise ContextLengthError(needed=needed, limit=self.max_total_tokens)
        if not (math.isfinite(params.temperature) and 0.0 <= params.temperature <= 2.0):
            raise GenerationRequestError("invalid_temperature", "temperature must be 0 to 2")
        if not (math.isfinite(params.top_p) and 0.0 < params.top_p <= 1.0):
            raise GenerationRequestError("invalid_top_p", "top_p must be in (0, 1]")
        if not _is_int(params.top_k, 0, self.vocab_size):
            raise GenerationRequestError(
                "invalid_top_k", f"top_k must be from 0 to {self.vocab_size}"
            )
        if params.seed is not None and not _is_int(params.seed, 0, (1 << 31) - 1):
            raise GenerationRequestError("invalid_seed", "seed must be from 0 to 2**31-1")
        if not all(_is_int(t, 0, self.vocab_size - 1) for t in params.stop_token_ids):
            raise GenerationRequestError("invalid_stop", "stop token ids must be token ids")
        if len(params.stop) > 4 or not all(0 < len(s) <= 256 for s in params.stop):
            raise GenerationRequestError(
                "invalid_stop", "at most 4 stop strings of 1 to 256 characters"
            )

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Generation:
        """Start generating after `prompt_ids`; iterate the result for tokens."""
        self.check(prompt_ids, params)
        og = self._og
        search: dict[str, Any] = {
            "max_length": len(prompt_ids) + params.max_tokens,
            "min_length": 0,
            "do_sample": not params.greedy,
        }
        if not params.greedy:
            search.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if params.seed is not None:
            search["random_seed"] = params.seed
        gen_params = og.GeneratorParams(self._model)
        gen_params.set_search_options(**search)
        generator = og.Generator(self._model, gen_params)
        try:
            generator.append_tokens([int(t) for t in prompt_ids])
        except RuntimeError:
            del generator
            raise GenerationRequestError(
                "invalid_prompt", "the model could not process this prompt"
            ) from None
        return Generation(
            generator, self._tokenizer.create_stream(), params, len(prompt_ids),
            self.eos_token_ids | frozenset(params.stop_token_ids),
        )


FinishReason = Literal["stop", "length"]


class TokenText:
    """Turns generated token ids into answer text and decides when the answer ends, the same
    way for every engine: a stop token (its text is not part of the answer), a stop string
    (cut before it; text that may begin one is held back until it is known), or max_tokens."""

    def __init__(self, stream: Any, params: SamplingParams, stop_ids: frozenset[int]) -> None:
        self._stream = stream
        self._params = params
        self._stop_ids = stop_ids
        self._pending = ""  # decoded text held back: it may be the start of a stop string
        self.count = 0

    def feed(
        self, token: int, *, exhausted: bool = False
    ) -> tuple[GeneratedToken, FinishReason | None]:
        """The text `token` completes and, if the answer ends with it, why. `exhausted`: the
        engine will produce no more tokens (its length bound)."""
        self.count += 1
        if token in self._stop_ids:
            return GeneratedToken(token, self._flush()), "stop"
        text = self._pending + self._stream.decode(token)
        self._pending = ""
        if self._params.stop:
            cut = min((i for s in self._params.stop if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                return GeneratedToken(token, text[:cut]), "stop"
            keep = self._held_back(text)
            if keep:
                text, self._pending = text[: len(text) - keep], text[len(text) - keep:]
        if self.count >= self._params.max_tokens or exhausted:
            return GeneratedToken(token, text + self._flush()), "length"
        return GeneratedToken(token, text), None

    def _held_back(self, text: str) -> int:
        """How many trailing characters of `text` may begin a stop string."""
        keep = 0
        for stop in self._params.stop:
            for n in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:n]):
                    keep = n
                    break
        return keep

    def _flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending


class Generation:
    """A running generation: iterate for `GeneratedToken`s; `close()` stops it at once and
    frees the generator and its KV cache. After the last token, `finish_reason` is "stop"
    (an end-of-sequence or stop token, or a stop string) or "length" (`max_tokens`).

    `close()` may come from another thread (a client that went away): the token being
    computed, if any, completes (milliseconds), then nothing more is computed."""

    def __init__(
        self,
        generator: Any,
        stream: Any,
        params: SamplingParams,
        prompt_tokens: int,
        stop_ids: frozenset[int],
    ) -> None:
        self._generator: Any = generator
        self._text = TokenText(stream, params, stop_ids)
        self.prompt_tokens = prompt_tokens
        self.finish_reason: FinishReason | None = None

    @property
    def completion_tokens(self) -> int:
        return self._text.count

    @property
    def closed(self) -> bool:
        return self._generator is None

    def close(self) -> None:
        """Stop now and release the generator (its KV cache goes with it)."""
        self._generator = None

    def __enter__(self) -> Generation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[GeneratedToken]:
        return self

    def __next__(self) -> GeneratedToken:
        generator = self._generator
        if generator is None:
            raise StopIteration
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        del generator
        if self._generator is None:  # closed meanwhile: the token is not delivered
            raise StopIteration
        piece, finish = self._text.feed(token, exhausted=self._generator.is_done())
        if finish is not None:
            self.finish_reason = finish
            self.close()
        return piece
