"""Threads for the blocking work of request handlers: one small pool per purpose.

Starlette's `run_in_threadpool` draws every call from one process-wide limit of 40
threads. Shared by everything, it let one tenant starve the others: 40 inference requests
queued on one busy worker held all 40 threads, and attestation, uploads and inference on
idle workers waited behind them. So blocking work is split by purpose, each with its own
bounded pool that no other purpose can exhaust:

- attestation (evidence for a nonce, boot evidence, BlindAI's quote): never behind models;
- uploads (validation in a worker, then sealing): wait for a worker, up to the load time
  limit, and the disk;
- store (delete, share): the disk only, so slow uploads never hold a delete back;
- inference does not appear here at all: a run waits in its worker's own queue
  (`ModelRegistry.run_async`), holding no thread while it waits.

Short CPU work (CBOR decoding, receipts, /metrics) still uses the shared pool: none of it
waits for anything. Health checks need no thread. The pools are shared by the native
app and the BlindAI listeners (which run their own event loop): executors, unlike anyio's
limiters, belong to no loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")

ATTESTATION_THREADS = 4
UPLOAD_THREADS = 8
STORE_THREADS = 4


class Offload:
    """The per-purpose pools. Threads start on first use; `close` lets them go."""

    def __init__(self) -> None:
        self._attestation = ThreadPoolExecutor(
            max_workers=ATTESTATION_THREADS, thread_name_prefix="blindinfer-attest"
        )
        self._uploads = ThreadPoolExecutor(
            max_workers=UPLOAD_THREADS, thread_name_prefix="blindinfer-upload"
        )
        self._store = ThreadPoolExecutor(
            max_workers=STORE_THREADS, thread_name_prefix="blindinfer-store"
        )

    async def attestation(
        self, call: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Runs `call` on the attestation threads (quotes, collateral)."""
        return await _run(self._attestation, functools.partial(call, *args, **kwargs))

    async def upload(self, call: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Runs `call` on the upload threads (registry.add)."""
        return await _run(self._uploads, functools.partial(call, *args, **kwargs))

    async def store(self, call: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Runs `call` on the model-store threads (delete, share)."""
        return await _run(self._store, functools.partial(call, *args, **kwargs))

    def close(self) -> None:
        for executor in (self._attestation, self._uploads, self._store):
            executor.shutdown(wait=False, cancel_futures=True)


async def _run(executor: ThreadPoolExecutor, call: Callable[[], _T]) -> _T:
    return await asyncio.get_running_loop().run_in_executor(executor, call)
