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
  worker before new ones are refused with OverloadedError. The exception is generation:
  concurrent generations of one model share the worker's turn and its decoding steps (up
  to `max_batch`; see `submit_generate` and runtime/generation_mux.py), multiplexed on
  the pipe by request id. Other requests for that worker wait until the batch drains
  rather than being served between two steps: their replies (raw tensor frames, a load)
  would have to be routed through the batch's reader, and their own timeouts entangled
  with it; a batch takes no newcomer once anyone waits behind it, so it drains within
  one generation's bound.

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

import asyncio
import contextlib
import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import queue
import re
import select
import signal
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt

from blindinfer.errors import ProtocolError
from blindinfer.protocol.datatypes import DATATYPES, dtype_to_datatype
from blindinfer.runtime import worker_io
from blindinfer.runtime.device import Device
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
from blindinfer.runtime.tensor_batch import TensorRun, batch_outputs, joined, new_run, split
from blindinfer.sizes import human_size

__all__ = ["LoadedModel", "ModelNotPlacedError", "WorkerPool", "WorkerStats"]

Array = npt.NDArray[Any]

_MAX_HEADER_BYTES: Final = 16 << 20
"""A header frame larger than this is a broken (or compromised) peer, never a real reply."""

_LOOP_COMMAND_BYTES: Final = 1 << 20
"""Inputs up to this size are sent from the event loop when the worker is idle
(`run_async`); larger ones are written by the worker's thread, where copying them into
one buffer first would not pay."""

_BATCH_INPUT_BYTES: Final = 16 << 20
"""The most input bytes one dynamic batch of tensor runs joins (`max_tensor_batch`), also
at most 1/8 of a worker's memory limit: the joined copy must not become the run's cost."""

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
    kv_bytes_per_token: int | None = None
    """Generative models: the KV cache one token of one request holds (fp32, at most)."""


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
    generating: int = 0
    """Generations running on this worker now (one batch, sharing its turn)."""
    peak_batch: int = 0
    """The most generations that shared one decoding step in this worker (from its final
    frames; 0 before the first generation)."""


# ---------------------------------------------------------------------------------------------
# framing (both sides)


def _send(conn: Connection, header: dict[str, Any], tensors: Mapping[str, Array]) -> None:
    """One JSON header frame, then one raw frame per tensor, in the header's order, all in
    one gathered write: the reader (the event loop's exchange) then wakes once, not once
    per frame, and finds the whole reply already there."""
    # Not np.ascontiguousarray: it turns a rank-0 tensor into shape (1,).
    contiguous = {
        name: array if array.flags.c_contiguous else array.copy(order="C")
        for name, array in tensors.items()
    }
    header["tensors"] = [[name, a.dtype.str, list(a.shape)] for name, a in contiguous.items()]
    parts: list[bytes | memoryview] = [json.dumps(header).encode()]
    parts += [array.reshape(-1).view(np.uint8).data for array in contiguous.values()]
    worker_io.write_frames(conn.fileno(), parts)


def _send_raw(conn: Connection, header: dict[str, Any], payload: bytes | bytearray) -> None:
    header["tensors"] = []
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(payload)


def _recv_payload(conn: Connection) -> bytes:
    """One `send_bytes` frame (a model's bytes), received straight into its final `bytes`.

    `Connection.recv_bytes` reads a large frame piece by piece, allocating a buffer of
    the remaining size for each piece and copying it into a BytesIO: for a 64 MiB model
    that is twice the time of one `recv(n, MSG_WAITALL)` on the socket (docs/
    performance.md). Same framing as `send_bytes` (4-byte big-endian length, or -1 then
    an 8-byte length); Connection buffers nothing, so the next frame is read as before.
    """
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:

        def exactly(n: int) -> bytes:
            data = sock.recv(n, socket.MSG_WAITALL) if n else b""
            if len(data) == n:
                return data
            if not data:
                raise EOFError
            parts = io.BytesIO(data)  # interrupted by a signal: the rest, piece by piece
            while parts.tell() < n:
                more = sock.recv(n - parts.tell(), socket.MSG_WAITALL)
                if not more:
                    raise EOFError
                parts.write(more)
            return parts.getvalue()

        (size,) = struct.unpack("!i", exactly(4))
        if size == -1:
            (size,) = struct.unpack("!Q", exactly(8))
        if size < 0:
            raise ValueError("malformed frame length")
        return exactly(size)


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
    arrays: dict[str, Array] = {}
    for name, dtype, shape, nbytes in _tensor_specs(header, max_bytes):
        array = np.empty(shape, dtype=dtype)
        if deadline is not None and not conn.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError
        received = conn.recv_bytes_into(array.reshape(-1).view(np.uint8).data)
        if received != nbytes:
            raise ValueError("tensor frame of the wrong size")
        arrays[name] = array
    return arrays


def _tensor_specs(
    header: Mapping[str, Any], max_bytes: int
) -> list[tuple[str, np.dtype[Any], tuple[int, ...], int]]:
    """The tensors `header` announces (name, dtype, shape, bytes), all checked before any
    is allocated: dtypes from the allowlist, sizes within `max_bytes` together. The one
    check of a peer's tensor list, for the thread path and the event loop's
    (runtime/worker_io.py) alike."""
    described = header.get("tensors", [])
    if not isinstance(described, list):
        raise ValueError("malformed tensor list")
    total = 0
    specs = []
    for item in described:
        if not (isinstance(item, list) and len(item) == 3):
            raise ValueError("malformed tensor description")
        name, dtype_str, shape = item
        # a str first: a list (unhashable) must be refused, not raise TypeError
        if not (isinstance(name, str) and isinstance(dtype_str, str)) or (
            dtype_str not in _ALLOWED_DTYPES
        ):
            raise ValueError(f"tensor dtype {str(dtype_str)[:20]!r} may not cross the pipe")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError("malformed tensor shape")
        dtype = np.dtype(dtype_str)
        nbytes = math.prod(shape) * dtype.itemsize
        total += nbytes
        if total > max_bytes:
            raise ValueError("tensors larger than a worker's memory limit")
        specs.append((name, dtype, tuple(shape), nbytes))
    return specs


# ---------------------------------------------------------------------------------------------
# the worker process

_device: Device = "cpu"
"""This worker's device (`serve --device`), set once at its start; runtime/device.py."""
_gpu_mem_limit: int | None = None
"""On CUDA: the cap of this worker's device memory arena (its memory limit)."""


def _limit_memory(limit: int, device: Device = "cpu") -> None:
    """Caps the worker's address space and data segment; no core dumps of tenant data.

    On CUDA the address space is left alone: the driver reserves terabytes of it (PROT_NONE,
    never backed) at start. RLIMIT_DATA still bounds what is writable and private (heap,
    numpy, onnxruntime's CPU buffers); device memory is bounded by the CUDA arena's
    `gpu_mem_limit` (runtime/device.py)."""
    import resource

    if device != "cuda":
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


_CUDA_OOM: Final = "CUDA failure 2:"
"""onnxruntime's words for cudaErrorMemoryAllocation outside its arena (cuDNN, cuBLAS)."""
_ARENA_CAP: Final = "is smaller than requested bytes of"
"""onnxruntime's BFC arena at its cap (the CUDA arena's, runtime/device.py): "Available
memory of N is smaller than requested bytes of M", not "Failed to allocate memory"."""


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
        "Failed to allocate memory" in t or "bad_alloc" in t or _CUDA_OOM in t or _ARENA_CAP in t
        for t in texts
    )
    sizes = [
        m for t in texts if (m := re.search(r"(?:buffer of size|requested bytes of) (\d+)", t))
    ]
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


def _worker_main(
    conn: Connection,
    memory_limit: int,
    intra_op_threads: int,
    device: Device = "cpu",
    spin_us: int | None = None,
) -> None:
    """The worker's loop: load / run / unload commands from the server, one at a time;
    generations (several at once, by id) are stepped between two commands."""
    global _device, _gpu_mem_limit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server; it closes us
    _device = device
    _gpu_mem_limit = memory_limit if device != "cpu" else None
    _limit_memory(memory_limit, device)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    # Imported only now, under the limits: onnxruntime's global state is created here.
    from blindinfer.runtime.session import ModelSession

    if device != "cpu":  # every session of this worker on it, its arena capped at the limit
        ModelSession = functools.partial(  # type: ignore[assignment,misc]
            ModelSession, device=device, gpu_mem_limit=memory_limit
        )
    # onnxruntime's pool threads busy-wait between operators, by default for long: with
    # several workers (and the server, and its clients) on a few cores they take the CPU
    # the others need (docs/performance.md, "Inference fixed cost: what was changed").
    ModelSession = functools.partial(  # type: ignore[assignment,misc]
        ModelSession, spin_us=spin_us
    )
    # onnxruntime's one-time global set-up (thread pools, allocators, kernel registries)
    # happens with the first session: pay it now so that no model's measured cost includes
    # it, and so that a limit too small for onnxruntime itself shows up at start.
    ModelSession(_identity_model(), intra_op_threads=intra_op_threads)
    from blindinfer.runtime.generation_mux import GenerationMux

    sessions: dict[str, ModelSession] = {}
    mux = GenerationMux(lambda frame: _send(conn, frame, {}))
    conn.send_bytes(json.dumps({"ok": True, "pid": os.getpid()}).encode())
    # Idle, the worker waits in poll() for a readable pipe, not in a blocking read: a
    # reader asleep in recv() on a Unix socket is also woken (for nothing) each time the
    # server reads the worker's last reply (unix_write_space wakes every sleeper on that
    # socket), which cost a context switch per request; poll() only wakes for POLLIN.
    readable = select.poll()
    readable.register(conn.fileno(), select.POLLIN)
    # The worker's own reads go straight to the socket (runtime/worker_io.WorkerReader):
    # the same frames as Connection.recv_bytes, without its BytesIO per frame.
    reader = worker_io.WorkerReader(conn.fileno())
    while True:
        # While generations run, the pipe is read between two steps: a new request joins
        # the batch, a cancel stops its generation before the next step.
        if mux.active and not conn.poll(0):
            try:
                mux.step()
            except BaseException as exc:  # a memory failure: every generation ends with it
                reply = _error_reply(exc)
                mux.fail_all(reply)
                if reply.get("recycle"):
                    return
            continue
        readable.poll()
        try:
            header = reader.header(_MAX_HEADER_BYTES)
        except EOFError:
            return
        try:
            op = header["op"]
            if op == "generate":
                # frames (text, final, errors) carry each request's id; none is sent here
                if not _start_generations(mux, sessions, header["requests"], conn):
                    return
                continue
            if op == "load":
                mux.forget(header["key"])
                reply = _load(sessions, header, _recv_payload(conn), intra_op_threads, ModelSession)
            elif op == "run":
                # A failure while frames are still unread leaves the pipe out of step:
                # the server replaces this worker then.
                try:
                    inputs = reader.tensors(_tensor_specs(header, memory_limit))
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
            elif op == "cancel":
                # its final frame follows; one that already ended is ignored
                mux.cancel(header["id"])
                continue
            elif op == "unload":
                sessions.pop(header["key"], None)
                mux.forget(header["key"])
                _trim()
                reply = {"ok": True}
            else:
                reply = {"ok": False, "kind": "internal", "message": f"unknown op {op!r}"}
        except BaseException as exc:  # every failure is reported; the loop goes on
            reply = _error_reply(exc)
        _send(conn, reply, {})
        if reply.get("recycle"):
            return  # the server replaces this worker; exiting keeps it from reading garbage


def _start_generations(
    mux: Any, sessions: Mapping[str, Any], requests: Any, conn: Connection
) -> bool:
    """Starts each generation of a `generate` frame (those that arrive together share the
    next step); a refused one gets its error frame at once. False: a memory failure, the
    worker must exit (every generation got the error)."""
    for request in requests:
        try:
            mux.start(sessions[request["key"]], request["key"], request)
        except BaseException as exc:
            reply = _error_reply(exc)
            rid = request.get("id") if isinstance(request, dict) else None
            _send(conn, reply | {"id": rid if type(rid) is int else None}, {})
            if reply.get("recycle"):
                mux.fail_all(reply)
                return False
    return True


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
    checked = bool(header.get("check"))
    if checked:
        _check_model(data)  # refuses external data first
    _trim()
    before = _rss_bytes()
    session = session_type(data, intra_op_threads=intra_op_threads, external_data_refused=checked)
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
    import errno
    import shutil
    import tempfile
    from pathlib import Path

    from blindinfer.protocol.model_archive import ArchiveLimits, extract_archive
    from blindinfer.runtime.extraction import extraction_parent
    from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions

    options = RuntimeOptions(
        provider=_device,  # the server's device, never the model's
        gpu_mem_limit=_gpu_mem_limit,
        intra_op_threads=max(1, intra_op_threads),
        max_new_tokens=int(header.get("max_new_tokens", 512)),
        max_context_tokens=int(header.get("max_context_tokens", 4096)),
    )
    view = memoryview(data)
    _trim()
    before = _rss_bytes()
    # mode 0700, this worker's own; in memory (tmpfs) when the model fits there, so that
    # the decrypted weights never reach a disk, and removed as soon as the session is
    # built; on disk only when /dev/shm has no room (runtime/extraction.py)
    session: GenerativeSession | None = None
    for parent in dict.fromkeys((extraction_parent(len(data)), None)):
        private = tempfile.mkdtemp(prefix="blindinfer-model-", dir=parent)
        try:
            folder = Path(private) / "model"
            try:
                extract_archive(
                    (view[i : i + (1 << 20)] for i in range(0, len(view), 1 << 20)),  # type: ignore[misc]
                    folder,
                    ArchiveLimits(max_total_bytes=max(1, len(data))),
                )
            except OSError as exc:
                if parent is None or exc.errno != errno.ENOSPC:
                    raise
                continue  # /dev/shm filled up meanwhile (another load): on disk instead
            session = GenerativeSession(folder, options, staging_parent=Path(private))
            break
        finally:
            shutil.rmtree(private, ignore_errors=True)
    if session is None:  # cannot happen: the last try (on disk) breaks or raises
        raise RuntimeError("the generative model was not loaded")
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
        # what one token of one request holds in KV cache (the tenant's KV budget counts it)
        "kv_bytes_per_token": session.config.decoder.kv_bytes_per_token,
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


class _Replaced(Exception):
    """The worker failed as a whole and was replaced already."""


_T = TypeVar("_T")


def _crashed(cause: BaseException) -> WorkerCrashedError:
    error = WorkerCrashedError("the worker running this model crashed; it was replaced")
    error.__cause__ = cause
    return error


def _cancelled_final() -> dict[str, Any]:
    """The final frame of a generation cancelled before it reached the worker."""
    return {
        "finish_reason": "cancelled",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "prompt_token_ids": [],
        "output_token_ids": [],
    }


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

    def try_acquire(self) -> bool:
        """Takes the gate only if it is free and nobody waits: never blocks (the loop's
        fast path, WorkerPool.run_async)."""
        with self._lock:
            if self._busy or self._waiters:
                return False
            self._busy = True
            return True

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
        # generations: the batch that new ones of its model may still join (None once any
        # other request queued behind it), and the one whose relay runs now
        self.joinable: _Batch | None = None
        self.active: _Batch | None = None
        self.peak_batch = 0
        # tensor runs queued with a tenant, that a turn of the same model may batch
        self.tensor_runs: deque[TensorRun] = deque()


class _GenRequest:
    """One generation, from `submit_generate` until its future is resolved. `done`: the
    future is resolved (a timed-out one may still owe its final frame to the relay)."""

    def __init__(
        self,
        rid: int,
        model_key: str,
        request: dict[str, Any],
        emit: Callable[[str], None],
        cancel: threading.Event,
    ) -> None:
        self.id = rid
        self.model_key = model_key
        self.request = request
        self.emit = emit
        self.cancel = cancel
        self.future: Future[dict[str, Any]] = Future()
        self.deadline = math.inf
        self.cancel_sent = False
        self.done = False


class _Batch:
    """Generations of one model that share a worker's turn: `waiting` joined and not yet
    sent (at most `max_batch` are `running` at once), `running` sent, until the worker's
    final frame for each. A wake-up pipe lets a joiner rouse the relay at once."""

    def __init__(self, model_key: str) -> None:
        self.model_key = model_key
        self.waiting: deque[_GenRequest] = deque()
        self.running: dict[int, _GenRequest] = {}
        self.open = True
        self.started = False
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)

    def unresolved_running(self) -> int:
        return sum(not r.done for r in self.running.values())

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            os.write(self._wake_w, b"\0")

    def drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.wake_r, 4096):
                pass

    def close(self) -> None:
        for fd in (self.wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Writer:
    """Writes a batch's commands to the worker from a thread of its own, so that the relay
    always reads: a large prompt written while the worker sends frames would otherwise fill
    both directions of the pipe and block both processes."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.failed = False
        self._thread = threading.Thread(target=self._run, name="blindinfer-writer", daemon=True)
        self._thread.start()

    def put(self, header: dict[str, Any]) -> None:
        self._queue.put(header)

    def _run(self) -> None:
        while (header := self._queue.get()) is not None:
            try:
                _send(self._conn, header, {})
            except (OSError, ValueError):  # the worker is gone: the relay sees it too
                self.failed = True
                return

    def close(self, timeout_s: float) -> bool:
        """Stops after what was queued; False if it is still blocked in a write."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


@dataclass(slots=True)
class _Placement:
    """Which worker holds a model, and its measured cost (the upload size until measured)."""

    worker: int
    memory_bytes: int
    kind: str = "tensor"
    # outputs with a dynamic axis 0, None when the model's inputs may not be batched
    batch_outputs: frozenset[str] | None = None


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
    waiting for one worker (not the ones it is serving). `max_batch`: the most generations
    one worker runs at once, sharing its decoding steps.
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        memory_limit_bytes: int,
        timeout_s: float,
        queue_limit: int = 32,
        source: Callable[[str], bytes | bytearray],
        intra_op_threads: int = 0,
        load_timeout_s: float = 120.0,
        max_response_bytes: int | None = None,
        max_new_tokens: int = 512,
        max_batch: int = 8,
        device: Device = "cpu",
        spin_us: int | None = 50,
        max_tensor_batch: int = 1,
    ) -> None:
        if workers < 1 or queue_limit < 0 or timeout_s <= 0 or load_timeout_s <= 0:
            raise ValueError("workers >= 1, queue_limit >= 0 and positive timeouts required")
        if not 1 <= max_batch <= 1024:
            raise ValueError("max_batch must be from 1 to 1024")
        self._max_batch = max_batch
        if not 1 <= max_tensor_batch <= 1024:
            raise ValueError("max_tensor_batch must be from 1 to 1024")
        # tensor runs of one model and one tenant joined into one onnxruntime run (1: off)
        self._max_tensor_batch = max_tensor_batch
        self._batch_bytes = min(_BATCH_INPUT_BYTES, memory_limit_bytes // 8)
        self._ids = itertools.count(1)  # generation ids, unique for the pool's life
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
        self._device = device  # every worker's sessions run there (runtime/device.py)
        # how long onnxruntime's threads busy-wait (ModelSession): short on shared cores
        self._spin_us = spin_us
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

    def load(self, model_key: str, data: bytes | bytearray, kind: str = "tensor") -> LoadedModel:
        """Places the model on the worker with the least measured memory and loads it there.

        No validation beyond ModelSession's (for bytes the caller already validated);
        loading a key that is already loaded replaces it, on the same worker.
        """
        return self._load(model_key, data, check=False, kind=kind)

    def validate_and_load(
        self, model_key: str, data: bytes | bytearray, kind: str = "tensor"
    ) -> LoadedModel:
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
            worker.joinable = None  # the drop gets the worker when its batch drains
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
        tenant: str | None = None,
    ) -> Future[dict[str, Array]]:
        """Queues a run on the model's worker; the future has the outputs or the error.

        `encoding` says which outputs the caller sends as JSON, for the response limit
        (ResponseTooLargeError; default: all binary). `tenant`: whose request this is;
        with `max_tensor_batch` > 1, runs of one tenant queued for the same model may
        share one onnxruntime run (runtime/tensor_batch.py); None: never batched.

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
            run = self._batchable(worker, model_key, arrays, wanted, encoding, tenant)
        if run is not None:
            return self._queue_run(worker, executor, run)
        return self._queue(
            worker, executor, self._run_queued, worker, model_key, arrays, wanted, encoding
        )

    def _queue(
        self,
        worker: _Worker,
        executor: ThreadPoolExecutor,
        job: Callable[..., _T],
        *args: Any,
    ) -> Future[_T]:
        """Puts a job on the worker's queue thread (its `pending` slot already taken)."""
        try:
            return executor.submit(job, *args)
        except RuntimeError:  # shut down by close() meanwhile
            with self._lock:
                worker.pending -= 1
            raise RuntimeError("the worker pool is closed") from None

    def _on_turn(
        self,
        worker: _Worker,
        model_key: str,
        work: Callable[[], _T],
        *,
        slots: int = 1,
    ) -> _T:
        """Runs `work` holding the worker's gate, once it is this job's turn: first the drops
        of unloaded models, the model still placed here (ModelNotPlacedError if it was
        unloaded while the job waited), a ready worker, the model reloaded if the worker
        was replaced. `slots`: the `pending` count the job gives back when it ends."""
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
            result = work()
            worker.service_s = 0.8 * worker.service_s + 0.2 * (time.monotonic() - started)
            return result
        finally:
            self._leave(worker, slots)

    def _run_queued(
        self,
        worker: _Worker,
        model_key: str,
        arrays: dict[str, Array],
        outputs: list[str] | None,
        encoding: OutputEncoding | None = None,
    ) -> dict[str, Array]:
        """A run, on the worker's own queue thread, once it is this request's turn."""
        header = self._run_header(model_key, outputs, encoding)
        return self._on_turn(
            worker, model_key, lambda: self._call(worker, header, arrays, self._timeout_s)[1]
        )

    def _batchable(
        self,
        worker: _Worker,
        model_key: str,
        arrays: dict[str, Array],
        wanted: list[str] | None,
        encoding: OutputEncoding | None,
        tenant: str | None,
    ) -> TensorRun | None:
        """The run as one that a turn may batch, queued on `worker.tensor_runs`, or None
        (batching off, no tenant, or a model or request it does not fit: the run goes
        alone, as before). Call with the pool's lock held, after `_enter`."""
        if self._max_tensor_batch < 2 or tenant is None:
            return None
        placement = self._models.get(model_key)
        if placement is None or placement.batch_outputs is None:
            return None
        header = self._run_header(model_key, wanted, encoding)
        run = new_run(model_key, tenant, arrays, header, wanted, placement.batch_outputs)
        if run is not None:
            worker.tensor_runs.append(run)
        return run

    def _queue_run(
        self, worker: _Worker, executor: ThreadPoolExecutor, run: TensorRun
    ) -> Future[dict[str, Array]]:
        """Queues a batchable run's own job; the run's future, which a batch led by an
        earlier run may resolve first. A job cancelled by `close` cancels its run, as the
        executor's own future would have been, unless a batch already took it."""

        def ended(job: Future[None]) -> None:
            if job.cancelled():
                with self._lock:
                    taken, run.claimed = run.claimed, True
                if not taken:
                    run.future.cancel()

        self._queue(worker, executor, self._tensor_turn, worker, run).add_done_callback(ended)
        return run.future

    def _tensor_turn(self, worker: _Worker, run: TensorRun) -> None:
        """A batchable run's job on the worker's queue thread: a no-op when a batch already
        took it (it only gives back its queue slot), else this run leads a batch of what
        is queued now (`_run_batch`). Never waits for more runs to come."""
        with self._lock:
            taken = run.claimed
            if not taken:
                run.claimed = True
                with contextlib.suppress(ValueError):
                    worker.tensor_runs.remove(run)
            if taken or run.future.cancelled():
                worker.pending -= 1
                return
        if not run.future.set_running_or_notify_cancel():
            with self._lock:
                worker.pending -= 1
            return
        try:
            self._on_turn(worker, run.model_key, lambda: self._run_batch(worker, run))
        except Exception as exc:  # before its turn (unloaded, closed, worker failed)
            if not run.future.done():
                run.future.set_exception(exc)

    def _claim(self, worker: _Worker, leader: TensorRun) -> list[TensorRun]:
        """The queued runs that join `leader`'s batch: same key (model, tenant, inputs,
        outputs, encoding), up to `max_tensor_batch` runs and the batch's byte bound.
        Cancelled ones are claimed (their job gives back the slot) but not run."""
        runs = [leader]
        size = leader.nbytes
        with self._lock:
            for run in list(worker.tensor_runs):
                if len(runs) >= self._max_tensor_batch:
                    break
                if run.claimed or run.key != leader.key:
                    continue
                if size + run.nbytes > self._batch_bytes:
                    break
                run.claimed = True
                worker.tensor_runs.remove(run)
                if run.future.set_running_or_notify_cancel():
                    runs.append(run)
                    size += run.nbytes
        return runs

    def _run_batch(self, worker: _Worker, leader: TensorRun) -> None:
        """`leader` and the runs queued behind it that fit, as one onnxruntime run whose
        outputs are split back by row count; if that fails, or the outputs do not split
        exactly, each run is done alone (its own deadline and error). Resolves every
        claimed future (call holding the gate, on the model's turn)."""
        runs = self._claim(worker, leader)
        try:
            if len(runs) > 1:
                parts: list[dict[str, Array]] | None = None
                with contextlib.suppress(Exception):
                    with self._lock:
                        placement = self._models.get(leader.model_key)
                    expected = placement.batch_outputs if placement is not None else None
                    inputs = joined(runs)
                    _, outputs = self._call(worker, leader.header, inputs, self._timeout_s)
                    parts = split(outputs, [run.rows for run in runs], expected)
                if parts is not None:
                    for run, part in zip(runs, parts, strict=True):
                        run.future.set_result(part)
                    return
            for run in runs:
                self._run_alone(worker, run)
        finally:
            for run in runs:  # whatever escaped: no caller waits forever
                if not run.future.done():
                    run.future.set_exception(RuntimeError("the batched run was abandoned"))

    def _run_alone(self, worker: _Worker, run: TensorRun) -> None:
        """One run of a batch that failed, on its own: a replaced worker is started again
        and the model reloaded first, as at the start of a turn."""
        try:
            self._ensure_ready(worker)
            if run.model_key not in worker.loaded:
                self._reload(worker, run.model_key)
            _, outputs = self._call(worker, run.header, run.arrays, self._timeout_s)
        except Exception as exc:
            run.future.set_exception(exc)
        else:
            run.future.set_result(outputs)

    async def run_async(
        self,
        model_key: str,
        inputs: Mapping[str, Array],
        outputs: Sequence[str] | None = None,
        *,
        encoding: OutputEncoding | None = None,
        tenant: str | None = None,
    ) -> dict[str, Array]:
        """`submit` for the event loop, with the same checks, errors and queue: when the
        model's worker is idle (and the command small), the exchange runs on the loop
        itself (runtime/worker_io.py), else the request queues on the worker's thread
        and is awaited without holding a thread. Cancelling the caller stops its wait,
        never the exchange: the worker's reply is read either way."""
        arrays = {name: np.asarray(array) for name, array in inputs.items()}
        for array in arrays.values():
            dtype_to_datatype(array.dtype)  # object/string arrays cannot cross as raw bytes
        wanted = list(outputs) if outputs else None
        header = self._run_header(model_key, wanted, encoding)
        small = sum(int(a.nbytes) for a in arrays.values()) <= _LOOP_COMMAND_BYTES
        with self._lock:
            worker = self._enter(model_key)
            fast = small and self._idle(worker, model_key) and worker.gate.try_acquire()
            executor = None if fast else self._executor(worker)
            run = None
            if not fast:
                run = self._batchable(worker, model_key, arrays, wanted, encoding, tenant)
        if run is not None and executor is not None:
            return await _awaited(asyncio.wrap_future(self._queue_run(worker, executor, run)))
        if executor is not None:
            queued = self._queue(
                worker, executor, self._run_queued, worker, model_key, arrays, wanted, encoding
            )
            return await _awaited(asyncio.wrap_future(queued))
        return await self._start_on_loop(worker, worker_io.frames(header, arrays))

    def _start_on_loop(self, worker: _Worker, command: bytes) -> asyncio.Future[dict[str, Array]]:
        """The exchange of `_call` on the loop, holding the gate `run_async` took, without
        a task in the common case: the command is sent at once, and a reply that is whole
        in the read-ahead buffer (a small, successful run) is checked and delivered at once
        or from the readiness callback. Anything else (a partial or large reply, a failure, a
        deadline, unloads waiting for the gate) goes on in `_run_on_loop`, a task, exactly
        as before. The caller awaits the returned future: cancelling it stops the wait,
        never the exchange (a task, a shield and their loop turns cost ~11 us per request:
        docs/performance.md, "Session 2026-12-07: fixed cost")."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, Array]] = loop.create_future()
        started = time.monotonic()
        exchange: worker_io.Exchange | None = None

        def finish_in_task(
            rest: bytes | memoryview, parsed: tuple[dict[str, Any], dict[str, Array]] | None
        ) -> None:
            task = asyncio.ensure_future(self._run_on_loop(worker, exchange, started, rest, parsed))
            task.add_done_callback(functools.partial(_deliver, done))

        try:
            exchange = self._new_exchange(worker, started)
        except OSError:  # the task tries again and answers as before (its worker replaced)
            finish_in_task(command, None)
            return done
        try:
            rest = exchange.send_now(command)
        except OSError:
            rest = memoryview(b"")  # it exited while we wrote: a reply it left is still read
        if rest:
            finish_in_task(rest, None)
            return done

        def ready(readable: bool) -> None:
            parsed = (
                exchange.reply_now(_MAX_HEADER_BYTES, self._max_reply_bytes, _tensor_specs)
                if readable
                else None
            )
            finish(parsed)

        def finish(parsed: tuple[dict[str, Any], dict[str, Array]] | None) -> None:
            if parsed is None or not parsed[0].get("ok"):
                finish_in_task(b"", parsed)
                return
            try:
                exchange.close()
            except OSError:  # (never seen) the task closes it again and answers the error
                finish_in_task(b"", parsed)
                return
            worker.service_s = 0.8 * worker.service_s + 0.2 * (time.monotonic() - started)
            with self._lock:
                if worker.drops:  # unloads wait for the gate: they are sent from a thread
                    finish_in_task(b"", parsed)
                    return
                worker.pending -= 1
                worker.gate.release()
            if not done.done():  # a caller that went away stopped waiting
                done.set_result(parsed[1])

        # The worker, woken by the command, often runs at once on this core and has
        # answered before `send` returns: then no watcher, timer or loop turn at all.
        parsed = exchange.reply_now(_MAX_HEADER_BYTES, self._max_reply_bytes, _tensor_specs)
        if parsed is not None:
            finish(parsed)
            return done
        try:
            exchange.when_readable(ready)
        except Exception:  # (never seen) the task's own wait meets it, as before
            finish_in_task(b"", None)
        return done

    def _new_exchange(self, worker: _Worker, started: float) -> worker_io.Exchange:
        assert worker.conn is not None
        return worker_io.Exchange(worker.conn.fileno(), started + self._timeout_s)

    def _idle(self, worker: _Worker, model_key: str) -> bool:
        """Whether a run of `model_key` needs nothing but the exchange itself: no unload,
        reload, start or generation first (call with the pool's lock held)."""
        return (
            not worker.drops
            and worker.active is None
            and worker.ready
            and worker.conn is not None
            and worker.process is not None
            and model_key in worker.loaded
            and worker.process.is_alive()
        )

    async def _run_on_loop(
        self,
        worker: _Worker,
        exchange: worker_io.Exchange | None,
        started: float,
        rest: bytes | memoryview,
        parsed: tuple[dict[str, Any], dict[str, Array]] | None,
    ) -> dict[str, Array]:
        """The rest of `_start_on_loop`'s exchange, in a task: sends `rest` of the command,
        reads and checks the reply (unless `parsed` already holds it), with the same
        replacements and errors as `_call`. Whatever blocks (killing and starting a worker,
        unloads) is done on a thread, the gate still held."""
        try:
            try:
                if exchange is None:
                    exchange = self._new_exchange(worker, started)
                if parsed is None:
                    parsed = await self._exchange(exchange, rest)
                else:
                    exchange.close()
            except TimeoutError as exc:
                await asyncio.to_thread(self._replace, worker)
                raise InferenceTimeoutError(
                    f"the model ran longer than {self._timeout_s:g} s; its worker was replaced"
                ) from exc
            except (worker_io.WorkerGone, OSError) as exc:
                await asyncio.to_thread(self._replace, worker)
                raise WorkerCrashedError(
                    "the worker running this model crashed; it was replaced"
                ) from exc
            except ValueError as exc:
                await asyncio.to_thread(self._replace, worker)
                raise WorkerCrashedError(
                    "the worker sent a malformed reply; it was replaced"
                ) from exc
            reply, results = parsed
            if not reply.get("ok"):
                raise await asyncio.to_thread(self._failure, worker, reply)
            worker.service_s = 0.8 * worker.service_s + 0.2 * (time.monotonic() - started)
            return results
        finally:
            await self._leave_from_loop(worker)

    async def _exchange(
        self, exchange: worker_io.Exchange, rest: bytes | memoryview
    ) -> tuple[dict[str, Any], dict[str, Array]]:
        """Writes the rest of the command, reads the reply and its tensors (checked as on
        the thread path, by `_tensor_specs`), within the exchange's deadline."""
        try:
            try:
                await exchange.send(rest)
            except TimeoutError:
                raise
            except OSError:
                pass  # it exited while we wrote: a reply it left first is still read
            return await exchange.reply(_MAX_HEADER_BYTES, self._max_reply_bytes, _tensor_specs)
        finally:
            exchange.close()

    async def _leave_from_loop(self, worker: _Worker) -> None:
        """`_leave` without blocking the loop: the gate is freed here when no unload waits,
        else the unloads (commands to the worker) are done on a thread first."""
        with self._lock:
            if not worker.drops:
                worker.pending -= 1
                worker.gate.release()
                return
        await asyncio.to_thread(self._leave, worker)

    def _run_header(
        self, model_key: str, outputs: list[str] | None, encoding: OutputEncoding | None
    ) -> dict[str, Any]:
        return {
            "op": "run",
            "key": model_key,
            "outputs": outputs,
            "encoding": encoding.to_wire() if encoding is not None else None,
            "max_bytes": self._max_response_bytes,
        }

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
        future ends with {"finish_reason", "prompt_tokens", "completion_tokens",
        "prompt_token_ids", "output_token_ids"}. Setting `cancel` stops the generation
        between two tokens (its KV cache is freed at once); the future then ends with
        finish_reason "cancelled". `timeout_s` bounds each generation (it then ends with
        InferenceTimeoutError). Same queue, refusals and errors as `submit`.

        Batching: a generation for a model that is already generating on its worker joins
        that batch without waiting for the worker's turn, as long as no other request
        queued for the worker after it (a tensor run, a load, an unload's drop: they get
        the worker when the batch drains, and a batch that takes no newcomers drains
        within one generation's bound). At most `max_batch` run at once; more wait in the
        batch for room. The worker shares each decoding step among them (see
        runtime/generation_mux.py)."""
        req = _GenRequest(next(self._ids), model_key, dict(request), emit, cancel)
        with self._lock:
            self._check_open()
            worker = self._placed(model_key)
            batch = worker.joinable
            if (
                batch is not None
                and batch.open
                and batch.model_key == model_key
                and not worker.drops
            ):
                room = batch.started and len(batch.running) + len(batch.waiting) < self._max_batch
                if not room:
                    self._check_queue(worker)
                worker.pending += 1
                batch.waiting.append(req)
                batch.wake()
                return req.future
            worker = self._enter(model_key)
            batch = _Batch(model_key)
            batch.waiting.append(req)
            worker.joinable = batch
            executor = self._executor(worker)
        try:
            queued = self._queue(worker, executor, self._generate_queued, worker, batch)
        except RuntimeError:  # closed meanwhile; `_queue` gave back this request's slot
            with self._lock:
                req.done = True  # its caller gets the error; those that joined meanwhile:
            self._end_batch(worker, batch, RuntimeError("the worker pool is closed"))
            batch.close()
            raise

        # close() cancels queued jobs: the batch's requests must still end
        def closed(job: Future[None]) -> None:
            if job.cancelled():
                self._end_batch(worker, batch, RuntimeError("the worker pool is closed"))
                batch.close()

        queued.add_done_callback(closed)
        return req.future

    def _generate_queued(self, worker: _Worker, batch: _Batch) -> None:
        """A batch, on the worker's queue thread, once it is its turn: its relay runs until
        the last of its generations ends (newcomers joining meanwhile)."""
        try:
            self._on_turn(worker, batch.model_key, lambda: self._relay(worker, batch), slots=0)
        except BaseException as exc:  # every request still in the batch ends with it
            self._end_batch(worker, batch, exc)
        finally:
            self._end_batch(worker, batch, RuntimeError("the generation ended unexpectedly"))
            batch.close()

    def _end_batch(self, worker: _Worker, batch: _Batch, error: BaseException) -> None:
        """Closes the batch to newcomers and fails every request it has not resolved."""
        with self._lock:
            batch.open = False
            if worker.joinable is batch:
                worker.joinable = None
            if worker.active is batch:
                worker.active = None
            left = [*batch.waiting, *batch.running.values()]
            batch.waiting.clear()
            batch.running.clear()
        for req in left:
            self._resolve(worker, req, error=error)

    def _resolve(
        self,
        worker: _Worker,
        req: _GenRequest,
        result: dict[str, Any] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Ends a request's future once (outside the pool's lock: its callbacks may take
        the caller's locks) and gives back its `pending` slot."""
        with self._lock:
            if req.done:
                return
            req.done = True
            worker.pending -= 1
        if error is not None:
            req.future.set_exception(error)
        else:
            req.future.set_result(result if result is not None else _cancelled_final())

    def _admit(self, worker: _Worker, batch: _Batch) -> list[_GenRequest] | None:
        """Moves waiting requests into the running batch while there is room. None when the
        batch is over (nothing running or waiting): it is closed to newcomers then."""
        dropped: list[tuple[_GenRequest, BaseException | None]] = []
        admitted: list[_GenRequest] = []
        now = time.monotonic()
        with self._lock:
            placement = self._models.get(batch.model_key)
            placed = placement is not None and placement.worker == worker.index
            while batch.waiting and len(batch.running) < self._max_batch:
                req = batch.waiting.popleft()
                if req.done:
                    continue
                if req.cancel.is_set():  # the client left while the request waited
                    dropped.append((req, None))
                elif not placed:  # unloaded meanwhile: the caller's registry retries
                    dropped.append((req, ModelNotPlacedError(batch.model_key)))
                else:
                    req.deadline = now + self._timeout_s
                    batch.running[req.id] = req
                    admitted.append(req)
            for req in list(batch.waiting):
                if req.cancel.is_set():
                    batch.waiting.remove(req)
                    dropped.append((req, None))
            over = not batch.running and not batch.waiting
            if over:
                batch.open = False
                if worker.joinable is batch:
                    worker.joinable = None
        for req, error in dropped:
            self._resolve(worker, req, error=error)
        return None if over else admitted

    def _relay(self, worker: _Worker, batch: _Batch) -> None:
        """Sends the batch's generations to the worker and dispatches its frames by id until
        the last one ends. Each request has its own deadline (it is cancelled in the worker
        and fails with InferenceTimeoutError); a worker that says nothing for `timeout_s`
        while generating is stuck and replaced, like one that crashes or talks nonsense:
        every request still running then fails."""
        assert worker.conn is not None and worker.process is not None
        conn, sentinel = worker.conn, worker.process.sentinel
        with self._lock:
            worker.active = batch
            batch.started = True
        writer = _Writer(conn)
        heard = time.monotonic()
        try:
            while True:
                was_idle = not batch.running
                admitted = self._admit(worker, batch)
                if admitted is None:
                    return
                if admitted:
                    heard = time.monotonic() if was_idle else heard
                    requests = [{**r.request, "id": r.id, "key": r.model_key} for r in admitted]
                    writer.put({"op": "generate", "requests": requests})
                now = time.monotonic()
                for req in list(batch.running.values()):
                    late = now >= req.deadline
                    if req.cancel_sent or not (late or req.cancel.is_set()):
                        continue
                    req.cancel_sent = True
                    writer.put({"op": "cancel", "id": req.id})
                    if late:
                        timeout = InferenceTimeoutError(
                            f"the generation ran longer than {self._timeout_s:g} s"
                        )
                        self._resolve(worker, req, error=timeout)
                if writer.failed and not conn.poll(0):
                    raise _Died
                # short waits: a cancel or a deadline is noticed within 50 ms; text and
                # newcomers (the wake-up pipe) at once
                ready = wait([conn, sentinel, batch.wake_r], 0.05)
                batch.drain_wake()
                if not conn.poll(0):
                    if sentinel in ready:
                        raise _Died
                    # silent (nothing unread) while generating: a step that never ends
                    if batch.running and time.monotonic() - heard > self._timeout_s:
                        raise _TimedOut
                    continue
                for _ in range(256):  # then look at cancels and newcomers again
                    self._dispatch(worker, batch, _recv_header(conn))
                    heard = time.monotonic()  # after `emit`: a slow consumer is not silence
                    if not conn.poll(0):
                        break
        except (_Died, EOFError, OSError) as exc:
            self._replace(worker)
            self._end_batch(worker, batch, _crashed(exc))
        except _TimedOut as exc:
            self._replace(worker)
            error = InferenceTimeoutError(
                f"the worker generated nothing for {self._timeout_s:g} s; it was replaced"
            )
            error.__cause__ = exc
            self._end_batch(worker, batch, error)
        except _Replaced as exc:  # the worker failed as a whole (memory): every request ends
            self._end_batch(worker, batch, _crashed(exc))
        except (ValueError, KeyError, TypeError) as exc:
            self._replace(worker)
            malformed = WorkerCrashedError("the worker sent a malformed reply; it was replaced")
            malformed.__cause__ = exc
            self._end_batch(worker, batch, malformed)
        finally:
            if not writer.close(5.0):  # blocked writing to a worker that does not read
                self._replace(worker)

    def _dispatch(self, worker: _Worker, batch: _Batch, frame: Mapping[str, Any]) -> None:
        """One frame of the worker, checked, to its request; ValueError if it is malformed
        (no such request, a bad piece of text or final frame)."""
        rid = frame.get("id")
        req = batch.running.get(rid) if type(rid) is int else None
        if req is None:
            raise ValueError("a frame for no running generation")
        if not frame.get("ok"):
            with self._lock:
                del batch.running[req.id]
            whole = frame.get("kind") == "memory" or bool(frame.get("recycle"))
            self._resolve(worker, req, error=self._failure(worker, frame))
            if whole:  # _failure replaced the worker: the others are gone with it
                raise _Replaced
            return
        if frame.get("end"):
            final = _final(frame)
            peak = frame.get("peak_batch")
            if type(peak) is not int or not 1 <= peak <= 1 << 16:
                raise ValueError("malformed final frame")
            with self._lock:
                del batch.running[req.id]
                worker.peak_batch = max(worker.peak_batch, peak)
            self._resolve(worker, req, result=final)
            return
        text = frame.get("text")
        if not isinstance(text, str) or len(text) > _MAX_PIECE_CHARS:
            raise ValueError("malformed text frame")
        if not (req.cancel_sent or req.done):
            try:
                req.emit(text)
            except Exception:  # the consumer is gone: stop it, keep the pipe in step
                req.cancel.set()

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
                        generating=len(worker.active.running) if worker.active else 0,
                        peak_batch=worker.peak_batch,
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
            args=(
                child_end,
                self._memory_limit,
                self._intra_op_threads,
                self._device,
                self._spin_us,
            ),
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
        with the pool's lock held). No generation joins a batch queued before this."""
        self._check_open()
        worker = self._placed(model_key)
        self._check_queue(worker)
        worker.pending += 1
        worker.joinable = None
        return worker

    def _placed(self, model_key: str) -> _Worker:
        """The model's worker (call with the pool's lock held)."""
        placement = self._models.get(model_key)
        if placement is None:
            raise ModelNotPlacedError(model_key)
        return self._workers[placement.worker]

    def _check_queue(self, worker: _Worker) -> None:
        """OverloadedError when `queue_limit` requests already wait for the worker (those
        it serves, a whole running batch or one other job, do not count)."""
        batch = worker.active
        serving = max(1, batch.unresolved_running() if batch is not None else 0)
        waiting = worker.pending - serving
        if waiting >= self._queue_limit:
            retry = (waiting + 1) * min(worker.service_s, self._timeout_s)
            raise OverloadedError(
                f"{waiting} requests already wait for this model's worker",
                retry_after_s=round(max(0.05, retry), 3),
            )

    def _leave(self, worker: _Worker, slots: int = 1) -> None:
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
                    worker.pending -= slots
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
            worker.joinable = None  # generations that come later wait for the load
        return worker

    def _load(
        self, model_key: str, data: bytes | bytearray, *, check: bool, kind: str
    ) -> LoadedModel:
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
            batch = batch_outputs(loaded.signature) if kind == "tensor" else None
            with self._lock:
                self._models[model_key] = _Placement(worker.index, loaded.memory_bytes, kind, batch)
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
        self,
        worker: _Worker,
        model_key: str,
        data: bytes | bytearray,
        *,
        check: bool,
        kind: str = "tensor",
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
                kv = reply.get("kv_bytes_per_token")
                if not (type(kv) is int and 0 < kv <= _MAX_KV_BYTES_PER_TOKEN):
                    raise ValueError("malformed generative signature")
                return LoadedModel(signature, memory, kind, context, vocab, kv)
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


def _deliver(done: asyncio.Future[_T], task: asyncio.Future[_T]) -> None:
    """Hands `task`'s outcome to `done`, unless its caller stopped waiting; either way the
    outcome is collected, so no 'exception never retrieved' is logged."""
    if task.cancelled():
        if not done.done():
            done.cancel()
        return
    exc = task.exception()
    if done.done():
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(task.result())


async def _awaited(future: asyncio.Future[_T]) -> _T:
    """Awaits work that others may share without letting a cancelled caller stop it;
    whatever it ends in is then collected, so no 'exception never retrieved' is logged."""
    future.add_done_callback(lambda f: None if f.cancelled() else f.exception())
    return await asyncio.shield(future)


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


_MAX_KV_BYTES_PER_TOKEN: Final = 1 << 33
"""`genai_config.ConfigLimits` bound it to 1024 layers * 2 * 1024 heads * 1024 * 4 bytes."""

_MAX_TOKEN_IDS: Final = 1 << 24
"""The most token ids one final frame may list (prompt or output; far above any context)."""


def _token_ids(value: object) -> list[int]:
    """A bounded list of u32 token ids from a worker's final frame, checked."""
    if not isinstance(value, list) or len(value) > _MAX_TOKEN_IDS:
        raise ValueError("malformed token ids")
    if not all(type(t) is int and 0 <= t < 1 << 32 for t in value):
        raise ValueError("malformed token ids")
    return value


def _final(frame: Mapping[str, Any]) -> dict[str, Any]:
    """The final frame of a generation, checked like any reply of the worker. The token ids
    (for the receipt) must agree with the counts (for usage and quotas)."""
    reason = frame["finish_reason"]
    counts = frame["prompt_tokens"], frame["completion_tokens"]
    if reason not in ("stop", "length", "cancelled") or not all(
        type(n) is int and n >= 0 for n in counts
    ):
        raise ValueError("malformed final frame")
    prompt_ids = _token_ids(frame["prompt_token_ids"])
    output_ids = _token_ids(frame["output_token_ids"])
    if (len(prompt_ids), len(output_ids)) != counts:
        raise ValueError("malformed final frame")
    return {
        "finish_reason": reason,
        "prompt_tokens": counts[0],
        "completion_tokens": counts[1],
        "prompt_token_ids": prompt_ids,
        "output_token_ids": output_ids,
    }


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
