"""Isolated model execution: onnxruntime runs in worker processes, never in the server.

A hostile or broken model can crash onnxruntime (a segfault takes the whole process with
it), allocate a tensor of 100 GB, or loop for minutes. In the server process any of these
would take down every tenant. Here each model lives in one of a few worker processes:

- **memory**: each worker caps its own address space (RLIMIT_AS, plus RLIMIT_DATA) at
  start. AS rather than RSS because Linux does not enforce RLIMIT_RSS at all, and
  onnxruntime's BFC arena reserves its buffers with plain malloc/mmap: an AS limit makes
  the oversized request itself fail (onnxruntime reports "Failed to allocate memory") before
  a single page is touched, so the machine never swaps or meets the OOM killer. The cap
  covers the whole worker, including Python, numpy and onnxruntime (~200 MiB of address
  space before the first model).
- **time**: a run that takes longer than `timeout_s` gets its worker SIGKILLed (there is
  no way to cancel onnxruntime cooperatively); a fresh worker replaces it.
- **crashes**: a worker that dies is replaced; the models it held are reloaded lazily on
  their next use from `source(model_key)` (the caller's sealed store), so other tenants
  see one slower request, not an error.
- **fairness**: a worker runs one request at a time, in arrival order; a slow model only
  delays the models that share its worker, and at most `queue_limit` requests wait for a
  worker before new ones are refused with OverloadedError.

Workers are started with the "spawn" start method: the server has threads (uvicorn, anyio,
onnxruntime pools) and fork would copy locks held by them in an undefined state, plus every
decrypted model and tensor in the server's memory. The worker is treated as untrusted by
the server: everything it sends back is checked (dtypes from an allowlist, sizes bounded)
before it becomes a numpy array, so a model that compromises onnxruntime gains no more
than its own sandbox.

Tensors cross the pipe as one JSON header frame followed by one raw frame per tensor
(`Connection.send_bytes` / `recv_bytes_into`), not pickle: no code runs on receipt, and an
output is received straight into the numpy array that is returned (no extra copy).

Spawned workers import the server's `__main__` module (multiprocessing's rule), so a
script that creates a pool must keep its work under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from blindinfer.errors import ProtocolError
from blindinfer.protocol.datatypes import DATATYPES, dtype_to_datatype
from blindinfer.runtime.errors import (
    GenerationRequestError,
    InferenceTimeoutError,
    InvalidModelError,
    InvalidTensorError,
    MemoryLimitError,
    ModelLoadCrashedError,
    OverloadedError,
    ResponseTooLargeError,
    WorkerCrashedError,
)
from blindinfer.runtime.response_size import OutputEncoding, response_bytes
from blindinfer.runtime.signature import ModelSignature, TensorSpec
from blindinfer.sizes import human_size

__all__ = ["LoadedModel", "ModelNotPlacedError", "WorkerPool", "WorkerStats"]

Array = npt.NDArray[Any]

_MAX_HEADER_BYTES: Final = 16 << 20
"""A header frame larger than this is a broken (or compromised) peer, never a real reply."""

_STARTUP_TIMEOUT_S: Final = 60.0
"""How long a freshly spawned worker may take to import numpy and onnxruntime."""

_ALLOWED_DTYPES: Final = frozenset(
    {dt.str for dt in DATATYPES.values()} | {dt.newbyteorder(">").str for dt in DATATYPES.values()}
)
"""numpy dtype strings that may cross the pipe: plain numbers only, never objects."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model placed in a worker: its signature and what loading it cost in memory."""

    signature: ModelSignature
    memory_bytes: int
    kind: str = "tensor"
    context_length: int | None = None
    """Generative models: the most tokens (prompt + answer) one request may hold."""
    vocab_size: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """One worker as seen from the server (for /metrics, logs and tests)."""

    index: int
    pid: int | None
    alive: bool
    models: tuple[str, ...]
    """Models placed on this worker (loaded now, or reloaded on their next use)."""
    loaded: tuple[str, ...]
    """Models that currently have a session in this worker process."""
    memory_bytes: int
    pending: int
    """Requests being served or waiting for this worker."""
    restarts: int


# ---------------------------------------------------------------------------------------------
# framing (both sides)


def _send(conn: Connection, header: dict[str, Any], tensors: Mapping[str, Array]) -> None:
    """One JSON header frame, then one raw frame per tensor, in the header's order."""
    # Not np.ascontiguousarray: it turns a rank-0 tensor into shape (1,).
    contiguous = {
        name: array if array.flags.c_contiguous else array.copy(order="C")
        for name, array in tensors.items()
    }
    header["tensors"] = [[name, a.dtype.str, list(a.shape)] for name, a in contiguous.items()]
    conn.send_bytes(json.dumps(header).encode())
    for array in contiguous.values():
        conn.send_bytes(array.reshape(-1).view(np.uint8).data)


def _send_raw(conn: Connection, header: dict[str, Any], payload: bytes) -> None:
    header["tensors"] = []
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(payload)


def _recv_header(conn: Connection) -> dict[str, Any]:
    header = json.loads(conn.recv_bytes(_MAX_HEADER_BYTES))
    if not isinstance(header, dict):
        raise ValueError("a header frame must be a JSON object")
    return header


def _recv_tensors(
    conn: Connection, header: Mapping[str, Any], max_bytes: int, deadline: float | None
) -> dict[str, Array]:
    """Receives the tensors announced by `header`, each straight into its own array.

    Every dtype and shape is checked before anything is allocated: on the server side the
    sender is a worker that may run a hostile model, and an object dtype or a huge shape
    would hand it the server's memory.
    """
    described = header.get("tensors", [])
    if not isinstance(described, list):
        raise ValueError("malformed tensor list")
    total = 0
    arrays: dict[str, Array] = {}
    for item in described:
        if not (isinstance(item, list) and len(item) == 3):
            raise ValueError("malformed tensor description")
        name, dtype_str, shape = item
        if not isinstance(name, str) or dtype_str not in _ALLOWED_DTYPES:
            raise ValueError(f"tensor dtype {str(dtype_str)[:20]!r} may not cross the pipe")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError("malformed tensor shape")
        dtype = np.dtype(dtype_str)
        nbytes = math.prod(shape) * dtype.itemsize
        total += nbytes
        if total > max_bytes:
            raise ValueError("tensors larger than a worker's memory limit")
        array = np.empty(tuple(shape), dtype=dtype)
        if deadline is not None and not conn.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError
        received = conn.recv_bytes_into(array.reshape(-1).view(np.uint8).data)
        if received != nbytes:
            raise ValueError("tensor frame of the wrong size")
        arrays[name] = array
    return arrays


# ---------------------------------------------------------------------------------------------
# the worker process


def _limit_memory(limit: int) -> None:
    """Caps the worker's address space and data segment; no core dumps of tenant data."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    # A crashing model must not leave its weights and inputs in a core file on the host.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = _libc()
    if libc is not None:
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: no core dump, no ptrace by peers
        libc.mallopt(-8, 2)  # M_ARENA_MAX = 2: each malloc arena reserves 64 MiB of AS


def _libc() -> Any:
    try:
        import ctypes

        return ctypes.CDLL(None)
    except OSError:  # not glibc: the limits still apply, only the tuning is skipped
        return None


def _rss_bytes() -> int:
    """Resident set size, from /proc/self/statm (pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Returns freed heap to the kernel so that RSS deltas measure live memory only."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _watch_parent(parent: int) -> None:
    """Exits when the server dies, even in the middle of an endless run.

    PR_SET_PDEATHSIG is not used: it fires when the *thread* that spawned the worker exits,
    and replacements are spawned from short-lived request threads.
    """
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _memory_failure(exc: BaseException) -> tuple[bool, int | None]:
    """Whether `exc` (or a cause) is an allocation failure, and the size asked for.

    The whole chain is read: ModelSession keeps only the start of onnxruntime's message.
    """
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__
    texts = [str(e) for e in chain]
    memory = any(isinstance(e, MemoryError) for e in chain) or any(
        "Failed to allocate memory" in t or "bad_alloc" in t for t in texts
    )
    sizes = [m for t in texts if (m := re.search(r"buffer of size (\d+)", t))]
    return memory, int(sizes[0].group(1)) if memory and sizes else None


def _error_reply(exc: BaseException) -> dict[str, Any]:
    """An error as data: kind, code and message only, never a pickled exception."""
    memory, asked = _memory_failure(exc)
    if memory:
        # The arena may have grown and other allocations may have failed half-way: only a
        # fresh process is known to be sound, so the server replaces this one.
        return {"ok": False, "kind": "memory", "asked": asked, "message": "", "recycle": True}
    kind = type(exc).__name__
    if not isinstance(exc, InvalidModelError | InvalidTensorError | ProtocolError):
        kind = "internal"
    message = getattr(exc, "message", None) or str(exc)
    return {"ok": False, "kind": kind, "code": getattr(exc, "code", ""), "message": message[:500]}


def _worker_main(conn: Connection, memory_limit: int, intra_op_threads: int) -> None:
    """The worker's loop: load / run / unload commands from the server, one at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server; it closes us
    _limit_memory(memory_limit)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    # Imported only now, under the limits: onnxruntime's global state is created here.
    from blindinfer.runtime.session import ModelSession

    # onnxruntime's one-time global set-up (thread pools, allocators, kernel registries)
    # happens with the first session: pay it now so that no model's measured cost includes
    # it, and so that a limit too small for onnxruntime itself shows up at start.
    ModelSession(_identity_model(), intra_op_threads=intra_op_threads)
    sessions: dict[str, ModelSession] = {}
    conn.send_bytes(json.dumps({"ok": True, "pid": os.getpid()}).encode())
    while True:
        try:
            header = _recv_header(conn)
        except EOFError:
            return
        try:
            op = header["op"]
            if op == "load":
                reply = _load(sessions, header, conn.recv_bytes(), intra_op_threads, ModelSession)
            elif op == "run":
                # A failure while frames are still unread leaves the pipe out of step:
                # the server replaces this worker then.
                try:
                    inputs = _recv_tensors(conn, header, memory_limit, None)
                except BaseException as exc:
                    reply = _error_reply(exc) | {"recycle": True}
                else:
                    outputs = sessions[header["key"]].run(inputs, header.get("outputs"))
                    del inputs
                    refusal = _oversized(outputs, header)
                    if refusal is None:
                        _send(conn, {"ok": True}, outputs)
                        continue
                    del outputs  # never sent: the server must not receive them at all
                    reply = refusal
            elif op == "generate":
                # streams text frames itself; the reply below is the final frame
                reply = _generate(sessions[header["key"]], header, conn)
            elif op == "cancel":
                continue  # a cancel that arrived after its generation ended: nothing to do
            elif op == "unload":
                sessions.pop(header["key"], None)
                _trim()
                reply = {"ok": True}
            else:
                reply = {"ok": False, "kind": "internal", "message": f"unknown op {op!r}"}
        except BaseException as exc:  # every failure is reported; the loop goes on
            reply = _error_reply(exc)
        _send(conn, reply, {})
        if reply.get("recycle"):
            return  # the server replaces this worker; exiting keeps it from reading garbage


def _oversized(outputs: Mapping[str, Array], header: Mapping[str, Any]) -> dict[str, Any] | None:
    """A refusal when `outputs` would make a response over the server's limit, else None.

    Checked here, on shapes and dtypes only, so that an output of gigabytes never crosses
    the pipe: the server neither receives nor encodes it. The pipe stays in step (the
    command was read in full), so the worker goes on serving.
    """
    limit = header.get("max_bytes")
    if limit is None:
        return None
    encoding = OutputEncoding.from_wire(header.get("encoding"))
    size = response_bytes(outputs, encoding)
    if size <= limit:
        return None
    raw = sum(int(array.nbytes) for array in outputs.values())
    as_json = not all(encoding.is_binary(name) for name in outputs)
    return {
        "ok": False,
        "kind": "ResponseTooLargeError",
        "size": size,
        "raw": raw,
        "json": as_json,
        "message": "",
    }


def _identity_model() -> bytes:
    """The smallest valid model (x -> Identity -> y), to warm onnxruntime up with."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "warm_up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return bytes(model.SerializeToString())


def _load(
    sessions: dict[str, Any],
    header: Mapping[str, Any],
    data: bytes,
    intra_op_threads: int,
    session_type: Callable[..., Any],
) -> dict[str, Any]:
    """Creates a session, measuring what it costs in resident memory.

    The model bytes stay alive across both measurements, so the cost is what the session
    adds (onnxruntime's own copy of the weights, kernels, plans), not the upload itself.
    """
    key = header["key"]
    sessions.pop(key, None)
    if header.get("kind") == "generative":
        return _load_generative(sessions, header, data, intra_op_threads)
    if header.get("check"):
        _check_model(data)
    _trim()
    before = _rss_bytes()
    session = session_type(data, intra_op_threads=intra_op_threads)
    _trim()
    cost = max(0, _rss_bytes() - before)
    sessions[key] = session
    signature = session.signature
    return {
        "ok": True,
        "memory_bytes": cost,
        "inputs": [[s.name, s.datatype, list(s.shape)] for s in signature.inputs],
        "outputs": [[s.name, s.datatype, list(s.shape)] for s in signature.outputs],
    }


def _load_generative(
    sessions: dict[str, Any], header: Mapping[str, Any], data: bytes, intra_op_threads: int
) -> dict[str, Any]:
    """A generative model: its archive (already checked by the server, parsed again here:
    the worker trusts nothing) extracted into a private 0700 folder of this worker,
    loaded by onnxruntime-genai with the server's options, then the folder is removed
    (the session holds what it needs). Replies with the cost and a small signature."""
    import shutil
    import tempfile
    from pathlib import Path

    from blindinfer.protocol.model_archive import ArchiveLimits, extract_archive
    from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions

    options = RuntimeOptions(
        intra_op_threads=max(1, intra_op_threads),
        max_new_tokens=int(header.get("max_new_tokens", 512)),
        max_context_tokens=int(header.get("max_context_tokens", 4096)),
    )
    view = memoryview(data)
    _trim()
    before = _rss_bytes()
    # mode 0700, this worker's own; in memory (tmpfs) where there is one, so that the
    # decrypted weights never reach a disk, and removed as soon as the session is built
    shm = "/dev/shm"  # noqa: S108 - mkdtemp makes a fresh 0700 folder there
    memory_dir = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
    private = tempfile.mkdtemp(prefix="blindinfer-model-", dir=memory_dir)
    try:
        folder = Path(private) / "model"
        extract_archive(
            (view[i : i + (1 << 20)] for i in range(0, len(view), 1 << 20)),  # type: ignore[misc]
            folder,
            ArchiveLimits(max_total_bytes=max(1, len(data))),
        )
        session = GenerativeSession(folder, options, staging_parent=Path(private))
    finally:
        shutil.rmtree(private, ignore_errors=True)
    _trim()
    cost = max(0, _rss_bytes() - before)
    sessions[header["key"]] = session
    return {
        "ok": True,
        "memory_bytes": cost,
        "inputs": [],
        "outputs": [],
        "kind": "generative",
        "context_length": session.max_total_tokens,
        "vocab_size": session.vocab_size,
    }


def _generate(session: Any, header: Mapping[str, Any], conn: Connection) -> dict[str, Any]:
    """Generates, sending one frame per piece of text; between tokens a `cancel` from the
    server (its client went away) stops at once and frees the generator and KV cache.
    Returns the final frame: finish reason and token counts."""
    from blindinfer.protocol.generation import SamplingParams
    from blindinfer.runtime.generative import GenerativeSession

    if not isinstance(session, GenerativeSession):
        raise ProtocolError("not_generative", "this model does not generate text")
    raw = header["params"]
    params = SamplingParams(
        max_tokens=raw["max_tokens"],
        temperature=raw["temperature"],
        top_p=raw["top_p"],
        top_k=raw["top_k"],
        seed=raw["seed"],
        stop=tuple(raw["stop"]),
    )
    prompt = header["prompt"]
    if "messages" in prompt:
        ids = session.chat_prompt_ids(prompt["messages"])
    else:
        ids = session.encode(prompt["text"])
    cancelled = False
    generation = session.generate(ids, params)
    with generation:
        for token in generation:
            if token.text:
                _send(conn, {"ok": True, "text": token.text}, {})
            if conn.poll(0) and _recv_header(conn).get("op") == "cancel":
                cancelled = True
                break
    return {
        "ok": True,
        "end": True,
        "finish_reason": "cancelled" if cancelled else (generation.finish_reason or "length"),
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
    }


def _check_model(data: bytes) -> None:
    """External data is refused first (the checker would stat the path), then ONNX's checker.

    Runs in the worker because the checker is C++ parsing hostile input too.
    """
    import onnx

    from blindinfer.runtime.external_data import refuse_external_data

    refuse_external_data(data)
    try:
        onnx.checker.check_model(data, full_check=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or ["unknown error"])[0][:300]
        raise InvalidModelError(f"the model is not valid ONNX: {first}") from exc


# ---------------------------------------------------------------------------------------------
# the server side


class _Died(Exception):
    """The worker process is gone (or its pipe is)."""


class _TimedOut(Exception):
    """The worker did not answer within the deadline."""


class _Gate:
    """A FIFO mutex: requests for one worker are served in arrival order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self) -> None:
        with self._lock:
            if not self._busy:
                self._busy = True
                return
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        waiter.acquire()  # released by release(): ownership is handed over, busy stays True

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._busy = False


class _Worker:
    """One worker slot: the current process, its pipe, and what it holds.

    Holds no reference to the pool, so that the pool's finalizer can reach the processes.
    Only the thread holding `gate` talks to the process. Runs are queued on `executor`
    (one thread per worker): a request waiting for a busy worker holds a queue entry, not
    a thread of the server. `drops` are unloads that wait for the current job to end.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.ready = False
        self.loaded: set[str] = set()
        self.gate = _Gate()
        self.drops: set[str] = set()
        self.executor: ThreadPoolExecutor | None = None
        self.pending = 0
        self.restarts = 0
        self.service_s = 0.01  # moving average of a request's time on this worker


@dataclass(slots=True)
class _Placement:
    """Which worker holds a model, and its measured cost (the upload size until measured)."""

    worker: int
    memory_bytes: int
    kind: str = "tensor"


def _stop(worker: _Worker, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; reaps the process and closes the pipe."""
    process, conn = worker.process, worker.conn
    worker.process, worker.conn, worker.ready = None, None, False
    if conn is not None:
        conn.close()
    if process is None:
        return
    if grace_s > 0 and process.is_alive():
        process.terminate()
        process.join(grace_s)
    if process.is_alive():
        process.kill()
    process.join(5.0)


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.executor is not None:
            worker.executor.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        _stop(worker, grace_s=1.0)


class ModelNotPlacedError(KeyError):
    """The model is not (or no longer) placed on a worker: it was unloaded, by a delete or
    an eviction, before or while the request waited for its worker. A KeyError for the
    pool's own callers; the registry turns it into a clean 404 or a retry."""


class WorkerPool:
    """Runs models in sandboxed worker processes; thread-safe.

    `source(model_key)` returns a model's bytes again when a replaced worker needs to
    reload it: the pool never keeps model bytes itself. `queue_limit` counts the requests
    waiting for one worker (not the one it is serving).
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        memory_limit_bytes: int,
        timeout_s: float,
        queue_limit: int = 32,
        source: Callable[[str], bytes],
        intra_op_threads: int = 0,
        load_timeout_s: float = 120.0,
        max_response_bytes: int | None = None,
        max_new_tokens: int = 512,
    ) -> None:
        if workers < 1 or queue_limit < 0 or timeout_s <= 0 or load_timeout_s <= 0:
            raise ValueError("workers >= 1, queue_limit >= 0 and positive timeouts required")
        self._memory_limit = memory_limit_bytes
        # Outputs are sized in the worker against this, before they cross the pipe (see
        # _oversized); None: only the worker's memory limit bounds them.
        self._max_response_bytes = max_response_bytes
        self._max_reply_bytes = min(memory_limit_bytes, max_response_bytes or memory_limit_bytes)
        self._timeout_s = timeout_s
        self._load_timeout_s = load_timeout_s
        self._queue_limit = queue_limit
        self._source = source
        self._intra_op_threads = intra_op_threads
        self._max_new_tokens = max_new_tokens  # generative models: the most tokens per answer
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._models: dict[str, _Placement] = {}
        self._closed = False
        self._workers = [_Worker(i) for i in range(workers)]
        # Also runs at interpreter exit: no worker outlives the server.
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for worker in self._workers:
            self._start(worker)
        for worker in self._workers:  # fail fast (e.g. a limit too small for onnxruntime)
            try:
                self._ensure_ready(worker)
            except WorkerCrashedError:
                self.close()
                raise

    # -- public API ---------------------------------------------------------------------------

    def load(self, model_key: str, data: bytes, kind: str = "tensor") -> LoadedModel:
        """Places the model on the worker with the least measured memory and loads it there.

        No validation beyond ModelSession's (for bytes the caller already validated);
        loading a key that is already loaded replaces it, on the same worker.
        """
        return self._load(model_key, data, check=False, kind=kind)

    def validate_and_load(self, model_key: str, data: bytes, kind: str = "tensor") -> LoadedModel:
        """An upload: refuses external data, runs onnx.checker (in the worker), then loads.
        A generative model (`kind`): its archive is extracted and loaded by
        onnxruntime-genai in the worker instead."""
        return self._load(model_key, data, check=True, kind=kind)

    def unload(self, model_key: str) -> None:
        """Forgets the model at once and frees its session; unknown keys are ignored.

        Never waits for the worker, never talks to it: the model stops being placed now
        (no new request reaches it), and its session is dropped by whoever holds the
        worker next, right after the job it is running (which may be this very model's
        run), or by the worker's queue thread if it is idle. So callers may hold their own
        locks around this (the registry evicts under its lock).
        """
        with self._lock:
            placement = self._models.pop(model_key, None)
            if placement is None:
                return
            worker = self._workers[placement.worker]
            worker.loaded.discard(model_key)  # in the books at once, in the process soon
            worker.drops.add(model_key)
            if self._closed:
                return
            executor = self._executor(worker)
        with contextlib.suppress(RuntimeError):  # closed meanwhile: the process goes anyway
            executor.submit(self._drain_now, worker)

    def _drain_now(self, worker: _Worker) -> None:
        """An unload's own turn on the worker (its queue thread), if nobody drained it."""
        if not worker.drops:
            return
        worker.gate.acquire()
        with self._lock:
            worker.pending += 1
        self._leave(worker)  # drops them, then frees the gate

    def run(
        self,
        model_key: str,
        inputs: Mapping[str, Array],
        outputs: Sequence[str] | None = None,
        *,
        encoding: OutputEncoding | None = None,
    ) -> dict[str, Array]:
        """Runs the model in its worker and waits for the result: `submit(...).result()`."""
        return self.submit(model_key, inputs, outputs, encoding=encoding).result()

    def submit(
        self,
        model_key: str,
        inputs: Mapping[str, Array],
        outputs: Sequence[str] | None = None,
        *,
        encoding: OutputEncoding | None = None,
    ) -> Future[dict[str, Array]]:
        """Queues a run on the model's worker; the future has the outputs or the error.

        `encoding` says which outputs the caller sends as JSON, for the response limit
        (ResponseTooLargeError; default: all binary).

        Same checks and errors as ModelSession.run, plus InferenceTimeoutError,
        WorkerCrashedError, MemoryLimitError, OverloadedError (raised here, when the
        worker's queue is full) and ModelNotPlacedError (a KeyError: the model is not
        loaded, or was unloaded while the request waited). Waiting in the queue holds no
        thread of the caller, and neither it nor reloading after a worker was replaced
        counts towards `timeout_s`.
        """
        arrays = {name: np.asarray(array) for name, array in inputs.items()}
        for array in arrays.values():
            dtype_to_datatype(array.dtype)  # object/string arrays cannot cross as raw bytes
        wanted = list(outputs) if outputs else None
        with self._lock:
            worker = self._enter(model_key)
            executor = self._executor(worker)
        try:
            return executor.submit(self._run_queued, worker, model_key, arrays, wanted, encoding)
        except RuntimeError:  # shut down by close() meanwhile
            with self._lock:
                worker.pending -= 1
            raise RuntimeError("the worker pool is closed") from None

    def _run_queued(
        self,
        worker: _Worker,
        model_key: str,
        arrays: dict[str, Array],
        outputs: list[str] | None,
        encoding: OutputEncoding | None = None,
    ) -> dict[str, Array]:
        """A run, on the worker's own queue thread, once it is this request's turn."""
        worker.gate.acquire()
        try:
            self._drain(worker)
            with self._lock:
                self._check_open()
                placement = self._models.get(model_key)
                if placement is None or placement.worker != worker.index:
                    raise ModelNotPlacedError(model_key)  # unloaded while this request waited
            self._ensure_ready(worker)
            if model_key not in worker.loaded:
                self._reload(worker, model_key)
            started = time.monotonic()
            header = {
                "op": "run",
                "key": model_key,
                "outputs": outputs,
                "encoding": encoding.to_wire() if encoding is not None else None,
                "max_bytes": self._max_response_bytes,
            }
            _, results = self._call(worker, header, arrays, self._timeout_s)
            worker.service_s = 0.8 * worker.service_s + 0.2 * (time.monotonic() - started)
            return results
        finally:
            self._leave(worker)

    def submit_generate(
        self,
        model_key: str,
        request: Mapping[str, Any],
        emit: Callable[[str], None],
        cancel: threading.Event,
    ) -> Future[dict[str, Any]]:
        """Queues a generation on the model's worker. `request` holds "prompt"
        ({"messages": [...]} or {"text": ...}) and "params" (SamplingParams.as_dict()).
        `emit(text)` is called, on the worker's queue thread, with each piece of text; the
        future ends with {"finish_reason", "prompt_tokens", "completion_tokens"}. Setting
        `cancel` stops the generation between two tokens (its KV cache is freed at once);
        the future then ends with finish_reason "cancelled". `timeout_s` bounds the whole
        generation. Same queue, refusals and errors as `submit`."""
        with self._lock:
            worker = self._enter(model_key)
            executor = self._executor(worker)
        try:
            return executor.submit(
                self._generate_queued, worker, model_key, dict(request), emit, cancel
            )
        except RuntimeError:
            with self._lock:
                worker.pending -= 1
            raise RuntimeError("the worker pool is closed") from None

    def _generate_queued(
        self,
        worker: _Worker,
        model_key: str,
        request: dict[str, Any],
        emit: Callable[[str], None],
        cancel: threading.Event,
    ) -> dict[str, Any]:
        worker.gate.acquire()
        try:
            self._drain(worker)
            with self._lock:
                self._check_open()
                placement = self._models.get(model_key)
                if placement is None or placement.worker != worker.index:
                    raise ModelNotPlacedError(model_key)
            if cancel.is_set():  # the client left while the request waited
                return {"finish_reason": "cancelled", "prompt_tokens": 0, "completion_tokens": 0}
            self._ensure_ready(worker)
            if model_key not in worker.loaded:
                self._reload(worker, model_key)
            started = time.monotonic()
            final = self._stream(
                worker, {"op": "generate", "key": model_key, **request}, emit, cancel
            )
            worker.service_s = 0.8 * worker.service_s + 0.2 * (time.monotonic() - started)
            return final
        finally:
            self._leave(worker)

    def _stream(
        self,
        worker: _Worker,
        header: dict[str, Any],
        emit: Callable[[str], None],
        cancel: threading.Event,
    ) -> dict[str, Any]:
        """Sends a generate command and relays its frames until the final one."""
        deadline = time.monotonic() + self._timeout_s
        cancelled = False
        try:
            self._write(worker, lambda conn: _send(conn, header, {}))
            while True:
                if cancel.is_set() and not cancelled:
                    cancelled = True
                    self._write(worker, lambda conn: _send(conn, {"op": "cancel"}, {}))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _TimedOut
                try:
                    # short waits: a cancel is noticed within 50 ms; text arrives at once
                    frame = self._reply(worker, min(0.05, left))
                except _TimedOut:
                    continue
                if not frame.get("ok"):
                    raise self._failure(worker, frame)
                if frame.get("end"):
                    return _final(frame)
                text = frame.get("text")
                if not isinstance(text, str) or len(text) > _MAX_PIECE_CHARS:
                    raise ValueError("malformed text frame")
                if not cancelled:
                    try:
                        emit(text)
                    except Exception:  # the consumer is gone: stop, keep the pipe in step
                        cancel.set()
        except (_Died, EOFError, OSError) as exc:
            self._replace(worker)
            raise WorkerCrashedError(
                "the worker running this model crashed; it was replaced"
            ) from exc
        except _TimedOut as exc:
            self._replace(worker)
            raise InferenceTimeoutError(
                f"the generation ran longer than {self._timeout_s:g} s; its worker was replaced"
            ) from exc
        except (ValueError, KeyError, TypeError) as exc:
            self._replace(worker)
            raise WorkerCrashedError("the worker sent a malformed reply; it was replaced") from exc

    def stats(self) -> list[WorkerStats]:
        """Per worker: pid, liveness, placed and loaded models, measured memory, queue."""
        with self._lock:
            result = []
            for worker in self._workers:
                placed = sorted(k for k, p in self._models.items() if p.worker == worker.index)
                process = worker.process
                result.append(
                    WorkerStats(
                        index=worker.index,
                        pid=process.pid if process is not None else None,
                        alive=process is not None and process.is_alive(),
                        models=tuple(placed),
                        loaded=tuple(sorted(worker.loaded)),
                        memory_bytes=sum(self._models[k].memory_bytes for k in placed),
                        pending=worker.pending,
                        restarts=worker.restarts,
                    )
                )
            return result

    def close(self) -> None:
        """Stops every worker (SIGTERM, then SIGKILL); the pool cannot be used afterwards.
        Runs still queued are cancelled."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the worker pool is closed")

    def _start(self, worker: _Worker) -> None:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_end, self._memory_limit, self._intra_op_threads),
            name=f"blindinfer-worker-{worker.index}",
            daemon=True,  # multiprocessing terminates daemonic children at interpreter exit
        )
        process.start()
        child_end.close()  # otherwise the parent never sees EOF when the worker dies
        worker.process, worker.conn, worker.ready = process, parent_end, False

    def _replace(self, worker: _Worker) -> None:
        """Kills the worker (no grace: it may be running a hostile model) and starts another.

        The caller holds the worker's gate. The new process imports onnxruntime in the
        background; the next request on this worker waits for it to be ready, so the
        request that failed returns at once.
        """
        _stop(worker, grace_s=0)
        with self._lock:
            worker.loaded.clear()
            worker.restarts += 1
        if not self._closed:
            self._start(worker)

    def _ensure_ready(self, worker: _Worker) -> None:
        """Waits for a new worker's hello; replaces one that died while idle.

        An idle death (the kernel's OOM killer, an operator's kill) must not fail the next,
        innocent request: it is noticed here, before a command is sent.
        """
        if worker.ready and worker.process is not None and worker.process.is_alive():
            return
        if worker.ready:
            self._replace(worker)
        if worker.conn is None or worker.process is None:
            self._check_open()
            self._start(worker)
        assert worker.conn is not None and worker.process is not None
        try:
            self._wait(worker, _STARTUP_TIMEOUT_S)
            _recv_header(worker.conn)
        except (_Died, _TimedOut, EOFError, OSError, ValueError) as exc:
            self._replace(worker)
            raise WorkerCrashedError(
                "a worker process failed to start (is memory_limit_bytes too small?)"
            ) from exc
        worker.ready = True

    def _executor(self, worker: _Worker) -> ThreadPoolExecutor:
        """The worker's queue thread, started at first use (call with the lock held)."""
        if worker.executor is None:
            worker.executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"blindinfer-worker-{worker.index}"
            )
        return worker.executor

    def _enter(self, model_key: str) -> _Worker:
        """Joins the queue of the model's worker, or refuses if the queue is full (call
        with the pool's lock held)."""
        self._check_open()
        placement = self._models.get(model_key)
        if placement is None:
            raise ModelNotPlacedError(model_key)
        worker = self._workers[placement.worker]
        if worker.pending > self._queue_limit:
            retry = worker.pending * min(worker.service_s, self._timeout_s)
            raise OverloadedError(
                f"{worker.pending - 1} requests already wait for this model's worker",
                retry_after_s=round(max(0.05, retry), 3),
            )
        worker.pending += 1
        return worker

    def _leave(self, worker: _Worker) -> None:
        """Frees the worker's gate, first dropping the sessions unloaded meanwhile.

        Checking for drops and releasing happen under the pool's lock, so an `unload` that
        found the gate taken is always carried out by this holder or the next one."""
        while True:
            # Even if a replacement failed to start, the gate must be freed: the next
            # request starts the worker again.
            with contextlib.suppress(Exception):
                self._drain(worker)
            with self._lock:
                if not worker.drops:
                    worker.pending -= 1
                    worker.gate.release()
                    return

    def _drain(self, worker: _Worker) -> None:
        """Drops the sessions of models unloaded while the worker was busy (caller holds
        the gate). A model placed on this worker again meanwhile is kept: it was reloaded."""
        with self._lock:
            keys = [
                key
                for key in worker.drops
                if key not in self._models or self._models[key].worker != worker.index
            ]
            worker.drops.clear()
        for key in keys:
            worker.loaded.discard(key)  # also a reload that raced with the unload
            if worker.ready and not self._closed:
                # If the worker fails now it is replaced: the session is gone either way.
                with contextlib.suppress(WorkerCrashedError, InferenceTimeoutError):
                    self._call(worker, {"op": "unload", "key": key}, {}, self._timeout_s)

    def _place(self, model_key: str, size_hint: int, kind: str = "tensor") -> _Worker:
        """An idle worker first (a load must not queue behind another model's runs when
        a worker is free), then the least total measured memory; the new model's bytes
        count until measured."""
        with self._lock:
            self._check_open()
            old = self._models.get(model_key)
            if old is not None:
                worker = self._workers[old.worker]
            else:
                totals = [0] * len(self._workers)
                counts = [0] * len(self._workers)
                for placement in self._models.values():
                    totals[placement.worker] += placement.memory_bytes
                    counts[placement.worker] += 1
                busy = [w.pending > 0 for w in self._workers]
                index = min(
                    range(len(self._workers)), key=lambda i: (busy[i], totals[i], counts[i], i)
                )
                worker = self._workers[index]
            self._models[model_key] = _Placement(worker.index, size_hint, kind)
            worker.pending += 1
        return worker

    def _load(self, model_key: str, data: bytes, *, check: bool, kind: str) -> LoadedModel:
        worker = self._place(model_key, len(data), kind)
        worker.gate.acquire()
        try:
            try:
                self._drain(worker)  # free what was unloaded before loading more
                self._ensure_ready(worker)
                loaded = self._load_on(worker, model_key, data, check=check, kind=kind)
            except BaseException:
                with self._lock:
                    self._models.pop(model_key, None)
                raise
            with self._lock:
                self._models[model_key] = _Placement(worker.index, loaded.memory_bytes, kind)
            return loaded
        finally:
            self._leave(worker)

    def _reload(self, worker: _Worker, model_key: str) -> None:
        """A replaced worker lost its sessions: the model comes back from the caller's store."""
        data = self._source(model_key)
        with self._lock:
            placed = self._models.get(model_key)
        kind = placed.kind if placed is not None else "tensor"
        try:
            loaded = self._load_on(worker, model_key, data, check=False, kind=kind)
        except ModelLoadCrashedError as exc:
            raise WorkerCrashedError(
                "the worker crashed while reloading this model; it was replaced"
            ) from exc
        with self._lock:
            placement = self._models.get(model_key)
            if placement is not None:
                placement.memory_bytes = loaded.memory_bytes

    def _load_on(
        self, worker: _Worker, model_key: str, data: bytes, *, check: bool, kind: str = "tensor"
    ) -> LoadedModel:
        """Loads in the worker whose gate the caller holds; maps failures to upload errors."""
        worker.loaded.discard(model_key)
        header = {
            "op": "load",
            "key": model_key,
            "check": check,
            "kind": kind,
            "max_new_tokens": self._max_new_tokens,
        }
        try:
            self._write(worker, lambda conn: _send_raw(conn, header, data))
            reply = self._reply(worker, self._load_timeout_s)
        except _Died as exc:
            self._replace(worker)
            raise ModelLoadCrashedError("the model crashed the runtime while loading") from exc
        except _TimedOut as exc:
            self._replace(worker)
            raise ModelLoadCrashedError(
                f"the model did not load within {self._load_timeout_s:g} s"
            ) from exc
        if not reply.get("ok"):
            if reply.get("recycle"):
                self._replace(worker)
                raise ModelLoadCrashedError(
                    "the model needs more memory than a worker may use while loading "
                    f"({self._memory_limit >> 20} MiB)"
                )
            raise InvalidModelError(str(reply.get("message", "the model cannot be loaded")))
        worker.loaded.add(model_key)
        try:
            signature = ModelSignature(
                inputs=tuple(_spec(item) for item in reply["inputs"]),
                outputs=tuple(_spec(item) for item in reply["outputs"]),
            )
            memory = int(reply["memory_bytes"])
            if kind == "generative":
                context, vocab = reply["context_length"], reply["vocab_size"]
                if not (type(context) is int and type(vocab) is int and context > 0 < vocab):
                    raise ValueError("malformed generative signature")
                return LoadedModel(signature, memory, kind, context, vocab)
        except (KeyError, TypeError, ValueError) as exc:
            self._replace(worker)
            raise WorkerCrashedError("the worker sent a malformed reply; it was replaced") from exc
        return LoadedModel(signature=signature, memory_bytes=memory)

    def _call(
        self,
        worker: _Worker,
        header: dict[str, Any],
        tensors: Mapping[str, Array],
        timeout_s: float,
    ) -> tuple[dict[str, Any], dict[str, Array]]:
        """One command and its reply; a dead, late or misbehaving worker is replaced."""
        deadline = time.monotonic() + timeout_s
        try:
            self._write(worker, lambda conn: _send(conn, header, tensors))
            reply = self._reply(worker, timeout_s)
            assert worker.conn is not None
            results = _recv_tensors(worker.conn, reply, self._max_reply_bytes, deadline)
        except (_Died, EOFError, OSError) as exc:
            self._replace(worker)
            raise WorkerCrashedError(
                "the worker running this model crashed; it was replaced"
            ) from exc
        except (_TimedOut, TimeoutError) as exc:
            self._replace(worker)
            raise InferenceTimeoutError(
                f"the model ran longer than {self._timeout_s:g} s; its worker was replaced"
            ) from exc
        except ValueError as exc:
            self._replace(worker)
            raise WorkerCrashedError("the worker sent a malformed reply; it was replaced") from exc
        if not reply.get("ok"):
            raise self._failure(worker, reply)
        return reply, results

    def _failure(self, worker: _Worker, reply: Mapping[str, Any]) -> Exception:
        """Rebuilds the worker's error; only known kinds, never the worker's own objects."""
        kind = reply.get("kind")
        message = str(reply.get("message", ""))
        code = str(reply.get("code", ""))
        if kind == "memory":
            self._replace(worker)
            asked = reply.get("asked")
            return MemoryLimitError(
                "the model needs more memory than a worker may use "
                f"({self._memory_limit >> 20} MiB"
                + (f"; it asked for {asked >> 20} MiB at once" if type(asked) is int else "")
                + "); its worker was replaced"
            )
        if reply.get("recycle"):
            self._replace(worker)
            return WorkerCrashedError(f"the worker failed and was replaced: {message}")
        if kind == "ResponseTooLargeError" and self._max_response_bytes is not None:
            return _too_large(reply, self._max_response_bytes)
        if kind == "InvalidTensorError":
            return InvalidTensorError(code or "inference_failed", message)
        if kind in ("GenerationRequestError", "ContextLengthError"):
            return GenerationRequestError(code or "invalid_request", message)
        if kind == "ProtocolError":
            return ProtocolError(code or "invalid_request", message)
        if kind == "InvalidModelError":
            return InvalidModelError(message)
        return RuntimeError(f"the worker failed unexpectedly: {message}")

    def _write(self, worker: _Worker, write: Callable[[Connection], None]) -> None:
        """Writes a command; a worker that stopped reading may still have left a reply."""
        assert worker.conn is not None
        try:
            write(worker.conn)
        except OSError as exc:  # it exited (or died) while we were still writing
            if not worker.conn.poll(0):
                raise _Died from exc

    def _reply(self, worker: _Worker, timeout_s: float) -> dict[str, Any]:
        self._wait(worker, timeout_s)
        assert worker.conn is not None
        try:
            return _recv_header(worker.conn)
        except (EOFError, OSError, ValueError) as exc:  # gone, or talking nonsense
            raise _Died from exc

    def _wait(self, worker: _Worker, timeout_s: float) -> None:
        """Until the worker has something to say, dies, or the time is up.

        The pipe is preferred over the process sentinel: a worker may write its reply and
        then exit, and that reply must still be read.
        """
        assert worker.conn is not None and worker.process is not None
        ready = wait([worker.conn, worker.process.sentinel], timeout_s)
        if not ready:
            raise _TimedOut
        if worker.conn not in ready and not worker.conn.poll(0):
            raise _Died


def _too_large(reply: Mapping[str, Any], limit: int) -> ResponseTooLargeError:
    """The worker's refusal of oversized outputs, its numbers checked like any reply."""
    size, raw = reply.get("size"), reply.get("raw")
    size = size if type(size) is int and size > limit else limit + 1
    raw = raw if type(raw) is int and raw >= 0 else None
    if reply.get("json") is True and raw is not None:
        what = f"up to {_sized(size)} as JSON ({_sized(raw)} of tensor data)"
        advice = "ask for the outputs as binary data, for fewer outputs or with smaller inputs"
    else:
        what = _sized(size)
        advice = "ask for fewer outputs or with smaller inputs"
    return ResponseTooLargeError(
        f"the response would be {what}; the limit is {limit} bytes ({human_size(limit)}, "
        f"--max-response-bytes): {advice}",
        size=size,
        limit=limit,
    )


_MAX_PIECE_CHARS: Final = 1 << 16
"""One frame of generated text: a token's text, or text held back for stop strings."""


def _final(frame: Mapping[str, Any]) -> dict[str, Any]:
    """The final frame of a generation, checked like any reply of the worker."""
    reason = frame["finish_reason"]
    counts = frame["prompt_tokens"], frame["completion_tokens"]
    if reason not in ("stop", "length", "cancelled") or not all(
        type(n) is int and n >= 0 for n in counts
    ):
        raise ValueError("malformed final frame")
    return {"finish_reason": reason, "prompt_tokens": counts[0], "completion_tokens": counts[1]}


def _sized(size: int) -> str:
    return f"{size} bytes ({human_size(size)})"


def _spec(item: Any) -> TensorSpec:
    """A TensorSpec from a worker's reply, checked like any untrusted input."""
    name, datatype, shape = item
    if not isinstance(name, str) or datatype not in DATATYPES:
        raise ValueError("malformed tensor spec")
    if not (isinstance(shape, list) and all(type(d) is int and d >= -1 for d in shape)):
        raise ValueError("malformed tensor shape")
    return TensorSpec(name=name, datatype=datatype, shape=tuple(shape))
