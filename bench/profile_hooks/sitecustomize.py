"""Timestamps inside the server and its workers, for bench/profile_inference.py.

Put on PYTHONPATH with BLINDINFER_PROFILE_DIR set, Python imports this module at start in
the server and in every worker it spawns (workers inherit the environment), and it wraps
the functions a run passes through so that each appends `event monotonic_ns` to a file of
its own process. time.monotonic_ns is one clock for every process of the machine, so the
events of the client, the server and the worker line up on one time axis. Each event costs
one os.write (a few microseconds). Not part of blindinfer: without the variable it does
nothing, and nothing of blindinfer imports it.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

_DIR = os.environ.get("BLINDINFER_PROFILE_DIR")
_fd: int | None = None


def mark(event: str) -> None:
    """Appends `event` and the time to this process's file (server-PID or worker-PID)."""
    global _fd
    now = time.monotonic_ns()
    if _fd is None:
        import multiprocessing

        role = "worker" if multiprocessing.parent_process() is not None else "server"
        path = os.path.join(_DIR or ".", f"{role}-{os.getpid()}.txt")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(_fd, f"{event} {now}\n".encode())


def _around(owner: Any, name: str, event: str) -> None:
    """Wraps owner.name (a function or a method) with `event.start` / `event.end` marks."""
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark(f"{event}.start")
        try:
            return original(*args, **kwargs)
        finally:
            mark(f"{event}.end")

    setattr(owner, name, wrapper)


def _around_async(owner: Any, name: str, event: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark(f"{event}.start")
        try:
            return await original(*args, **kwargs)
        finally:
            mark(f"{event}.end")

    setattr(owner, name, wrapper)


def install() -> None:
    import onnxruntime
    from starlette.responses import Response
    from uvicorn.protocols.http import httptools_impl

    from blindinfer.runtime import workers
    from blindinfer.server import respond
    from blindinfer.server.routes import inference
    from blindinfer.store import registry

    # server: bytes (already decrypted by the TLS transport) reach the HTTP parser
    _around(httptools_impl.HttpToolsProtocol, "data_received", "s.data_received")
    _around_async(inference, "read_bounded", "s.read_body")
    _around(inference, "parse_infer_request", "s.parse")
    _around(registry.ModelRegistry, "submit", "s.submit")
    _around_async(registry.ModelRegistry, "run_async", "s.run_async")
    _around(workers.WorkerPool, "_run_queued", "s.queue_thread")
    _around(workers.WorkerPool, "_call", "s.call")
    _around(workers.WorkerPool, "_wait", "s.wait_worker")
    _around(inference, "encode_infer_response", "s.encode")
    _around_async(Response, "__call__", "s.respond")
    _around_async(respond, "send_bytes", "s.respond")  # the inference route's response
    # both sides of the pipe (the file name says which process)
    _around(workers, "_send", "pipe_send")
    _around(workers, "_recv_header", "pipe_recv_header")
    _around(workers, "_recv_tensors", "pipe_recv_tensors")
    from blindinfer.runtime import worker_io

    if hasattr(worker_io, "WorkerReader"):  # the worker's own reads (since 2026-12-07)
        _around(worker_io.WorkerReader, "header", "pipe_recv_header")
        _around(worker_io.WorkerReader, "tensors", "pipe_recv_tensors")
    # worker: onnxruntime itself
    _around(onnxruntime.InferenceSession, "run", "w.ort_run")


if _DIR:
    install()
