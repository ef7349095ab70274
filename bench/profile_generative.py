"""Where the server's CPU goes per generated token: py-spy on a real server, by function.

Starts the same server as bench/bench_generative.py (simulation, one worker, `--threads`),
uploads SmolLM2-135M int4, and samples the server process with py-spy (`--threads`,
active samples only) while `--requests` streamed chat completions of `--tokens` tokens run
one after another through `client.openai()`. Prints, per thread kind (the event loop, the
worker pool's relay threads, others) and per function, the CPU milliseconds per generated
token: self time (the function's own frames) and inclusive time of the functions on the
per-token path. The worker process (onnxruntime-genai's compute) is not sampled here:
bench_generative.py reads its CPU per token from /proc.

Run: `.venv/bin/python bench/profile_generative.py` (needs `py-spy`, the `bench` extra, and
a kernel that lets a parent trace its child). A diagnosis tool, not a benchmark: sampling
at 1 kHz costs the sampled process a little.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_generative as bench

RATE = 500
INCLUSIVE = (
    # event loop: the route's stream, its rendering, the HTTP and TLS writes
    ("_events (openai.py)", "_events (blindinfer/server/routes/openai.py"),
    ("generate_async (registry.py)", "generate_async (blindinfer/store/registry.py"),
    ("ChatCompletionStream.text", "text (blindinfer/protocol/openai_responses.py"),
    ("starlette StreamingResponse", "stream_response (starlette/responses.py"),
    ("uvicorn send", "send (uvicorn/protocols/http/httptools_impl.py"),
    ("receipt signing", "generation_receipt"),
    ("until_disconnect", "blindinfer/server/disconnect.py"),
    # relay thread
    ("relay: multiprocessing wait()", "wait (multiprocessing/connection.py"),
    ("relay: _recv_header", "_recv_header (blindinfer/runtime/workers.py"),
    ("relay: emit -> call_soon_threadsafe", "call_soon_threadsafe"),
)


def kind(stack: list[str]) -> str:
    text = ";".join(stack)
    if "workers.py" in text and "_events (" not in text:
        return "relay threads"
    if "run_forever" in text or "uvloop" in text or "asyncio" in text or "_run (" in text:
        return "event loop"
    return "other threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--dump", type=int, default=0, help="print the first N raw stacks")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    folder = bench.converted_model()
    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="profile-gen-")))
        log = stack.enter_context((logs / "server.log").open("w"))
        server, client = stack.enter_context(
            bench.blindinfer_server(args.threads, args.tokens, log)
        )
        client.upload_model(str(folder), name=bench.MODEL)
        sdk = stack.enter_context(client.openai())
        nonce = random.randrange(10_000, 90_000)
        for i in range(2):  # warm-up
            bench.sdk_stream(sdk, bench.messages_for(nonce + i), args.tokens)
        out = logs / "stacks.txt"
        recorder = subprocess.Popen(
            [py_spy, "record", "--pid", str(server.process.pid), "--rate", str(RATE),
             "--threads", "--gil", "--format", "raw", "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)
        tokens = 0
        started = time.perf_counter()
        for i in range(args.requests):
            tokens += bench.sdk_stream(sdk, bench.messages_for(nonce + 10 + i), args.tokens).tokens
        elapsed = time.perf_counter() - started
        time.sleep(0.2)
        recorder.send_signal(2)  # SIGINT: py-spy writes what it has
        _, err = recorder.communicate(timeout=60)
        if not out.is_file():
            sys.exit(f"py-spy wrote nothing: {err.strip()[-500:]}")
        lines = out.read_text().splitlines()
        if args.dump:
            print("\n".join(line[:400] for line in lines[: args.dump]))

    per_kind: collections.Counter[str] = collections.Counter()
    own: collections.Counter[tuple[str, str]] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        thread_kind = kind(frames)
        per_kind[thread_kind] += count
        own[(thread_kind, frames[-1])] += count
        for label, needle in INCLUSIVE:
            if needle in stack_text:
                inclusive[label] += count

    def ms_per_token(samples: int) -> float:
        return samples / RATE * 1000 / tokens

    print(
        f"{args.requests} streamed requests, {tokens} tokens, {elapsed:.1f} s "
        f"({tokens / elapsed:.1f} tok/s while sampled at {RATE} Hz); server CPU ms per token:"
    )
    for name, samples in per_kind.most_common():
        print(f"  {name:<16} {ms_per_token(samples):.3f}")
    print("Inclusive, on the per-token path (ms per token):")
    for label, _ in INCLUSIVE:
        print(f"  {label:<36} {ms_per_token(inclusive[label]):.3f}")
    print(f"Top {args.top} functions by own time (ms per token):")
    for (thread_kind, frame), samples in own.most_common(args.top):
        print(f"  {ms_per_token(samples):.3f}  [{thread_kind}] {frame[:110]}")


if __name__ == "__main__":
    main()
