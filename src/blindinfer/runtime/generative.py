"""Token generation for onnxruntime-genai model folders, with the server's options.

A generative model is an onnxruntime-genai folder (`genai_config.json`, the ONNX decoder and
its external data, `tokenizer.json`, `tokenizer_config.json`, a chat template). Its
`genai_config.json` is untrusted: read as-is, onnxruntime-genai would let it pick the
execution providers and devices, thread counts, a profiling output path and even a shared
library to load (`session_options.custom_ops_library`). So the runtime never hands the
model's config to onnxruntime-genai. `load_config` parses it once
(`blindinfer.protocol.genai_config.parse_genai_config`: bounded, strict, allow-listed), with
the folder's regular files as the names the decoder may use (a link, folder or device in the
model folder refuses the model); `GenerativeSession` loads the model from a private staging
folder holding `render(...)` of that config (the server's `RuntimeOptions`: threads, spinning
off, CPU provider, no profiling, no custom ops; neutral search defaults) and links to the
model's other files, then removes the staging folder.

Generation (`GenerativeSession.generate`) takes token ids and the wire's
`blindinfer.protocol.generation.SamplingParams` (one type for every front end; its values are
already bounded by construction), plus the stop token ids of the model or request, and
returns a `Generation`: an iterator of `GeneratedToken` (id and the text it completes,
decoded by onnxruntime-genai's `TokenizerStream`), then `finish_reason` ("stop" or "length")
and the token counts. The bounds that depend on the model and the server are checked here,
before a KV cache exists: token ids inside the vocabulary, `max_tokens` within the server's
limit, prompt + `max_tokens` within the model's context and the server's limit
(`ContextLengthError`); top_k above the vocabulary is clamped to it (the same cut).
`Generation.close()` stops a generation at once and frees its generator and KV cache (a
client that went away).

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
rendered config, same `check` bounds first, the same `TokenText`); the server sends
seeded requests to a Generator until paged exports are available.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from blindinfer.protocol.genai_config import (
    ConfigLimits,
    GenaiConfig,
    GenaiConfigError,
    parse_genai_config,
    render,
)
from blindinfer.protocol.generation import FinishReason, SamplingParams
from blindinfer.protocol.model_archive import CONFIG_NAME, MAX_CONFIG_BYTES
from blindinfer.runtime.device import DEVICES, Device
from blindinfer.runtime.errors import (
    ContextLengthError,
    GenerationRequestError,
    InvalidModelError,
)

__all__ = [
    "GeneratedToken",
    "Generation",
    "GenerativeSession",
    "RuntimeOptions",
    "TokenText",
    "load_config",
]

_MAX_OPTION = 1 << 20


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """What the server decides for every generative model, whatever its config says."""

    intra_op_threads: int = 1
    max_context_tokens: int = 4096  # prompt + generated tokens, per request
    max_new_tokens: int = 1024  # the largest max_tokens a request may ask for
    provider: Device = "cpu"  # `serve --device` (runtime/device.py), never the model's
    gpu_mem_limit: int | None = None  # cuda: the worker's device memory arena cap, bytes

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "max_context_tokens", "max_new_tokens"):
            if not _is_int(getattr(self, name), 1, _MAX_OPTION):
                raise ValueError(f"{name} must be a positive integer")
        if self.provider not in DEVICES:
            raise ValueError(f"provider must be one of {DEVICES}")


@dataclass(frozen=True, slots=True)
class GeneratedToken:
    """One generated token and the text it completes (may be "" while a multi-byte
    character or a possible stop string is still incomplete)."""

    token_id: int
    text: str


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _regular_files(folder: Path) -> frozenset[str]:
    """The names of `folder`'s files. A link, folder or device in it refuses the model:
    nothing the model names may lead outside its folder."""
    try:
        entries = list(folder.iterdir())
        regular = all(stat.S_ISREG(entry.lstat().st_mode) for entry in entries)
    except OSError:
        raise InvalidModelError("the model folder could not be read") from None
    if not regular:
        raise InvalidModelError("the model folder may hold only regular files")
    return frozenset(entry.name for entry in entries)


def load_config(
    folder: Path, limits: ConfigLimits | None = None
) -> tuple[GenaiConfig, frozenset[str]]:
    """The model's genai_config.json parsed once (read at most MAX_CONFIG_BYTES + 1 bytes,
    never through a link), and the folder's file names. Raises InvalidModelError."""
    names = _regular_files(folder)
    try:
        fd = os.open(folder / CONFIG_NAME, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError:
        raise InvalidModelError("genai_config.json: missing or unreadable") from None
    try:
        return parse_genai_config(raw, entries=names, limits=limits), names
    except GenaiConfigError as exc:
        raise InvalidModelError(exc.message) from None


def _stage(folder: Path, names: Collection[str], config: bytes, parent: Path | None) -> Path:
    """A private folder with the rendered `config` and links to the model's other files
    (`names`: its regular files, from `load_config`)."""
    staging = Path(tempfile.mkdtemp(prefix="genai-", dir=parent))
    try:
        for name in sorted(names):
            if name != CONFIG_NAME:
                os.symlink((folder / name).resolve(), staging / name)
        (staging / CONFIG_NAME).write_bytes(config)
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
        self.config, names = load_config(folder)
        self.context_length: int = self.config.context_length
        self.vocab_size: int = self.config.vocab_size
        self.eos_token_ids: frozenset[int] = frozenset(self.config.eos_token_ids)
        rendered = render(
            self.config,
            intra_op_threads=options.intra_op_threads,
            provider=options.provider,
            gpu_mem_limit=options.gpu_mem_limit,
            max_length=self.max_total_tokens,
            neutral_search=True,
        )
        # the genai_config.json og loads: the model's architecture, the server's options
        self.rendered_config: bytes = rendered
        staging = _stage(folder, names, rendered, staging_parent)
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

    def check(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Collection[int] = (),
    ) -> None:
        """Refuse what this model and server cannot generate within bounds, before anything
        is allocated. `params` is bounded by its type; what depends on the model (the
        vocabulary, the context) and the server's limits is checked here."""
        if not prompt_ids:
            raise GenerationRequestError("empty_prompt", "the prompt has no tokens")
        if not all(_is_int(t, 0, self.vocab_size - 1) for t in prompt_ids):
            raise GenerationRequestError(
                "invalid_token_id", f"prompt token ids must be in [0, {self.vocab_size})"
            )
        if params.max_tokens > self.options.max_new_tokens:
            raise GenerationRequestError(
                "invalid_max_tokens",
                f"max_tokens must be from 1 to {self.options.max_new_tokens}",
            )
        needed = len(prompt_ids) + params.max_tokens
        if needed > self.max_total_tokens:
            raise ContextLengthError(needed=needed, limit=self.max_total_tokens)
        if not all(_is_int(t, 0, self.vocab_size - 1) for t in stop_token_ids):
            raise GenerationRequestError("invalid_stop", "stop token ids must be token ids")

    def top_k(self, params: SamplingParams) -> int:
        """`params.top_k` within the vocabulary (a larger cut keeps every token, as 0 does)."""
        return min(params.top_k, self.vocab_size)

    def stop_ids(self, stop_token_ids: Collection[int]) -> frozenset[int]:
        """The token ids that end an answer: the model's end of sequence and the request's."""
        return self.eos_token_ids | frozenset(stop_token_ids)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Collection[int] = (),
    ) -> Generation:
        """Start generating after `prompt_ids`; iterate the result for tokens. A token of
        `stop_token_ids` (or the model's end of sequence) ends the answer."""
        self.check(prompt_ids, params, stop_token_ids)
        og = self._og
        search: dict[str, Any] = {
            "max_length": len(prompt_ids) + params.max_tokens,
            "min_length": 0,
            "do_sample": not params.greedy,
        }
        if not params.greedy:
            search.update(
                temperature=params.temperature, top_p=params.top_p, top_k=self.top_k(params)
            )
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
            generator,
            self._tokenizer.create_stream(),
            params,
            len(prompt_ids),
            self.stop_ids(stop_token_ids),
        )


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
                text, self._pending = text[: len(text) - keep], text[len(text) - keep :]
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
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
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
