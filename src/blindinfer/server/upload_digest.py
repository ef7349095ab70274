"""The SHA-256 of an upload, computed on a thread while the event loop keeps receiving.

Why: the upload route hashed each chunk on the event loop, between TLS decryptions and
copies, so they took turns on one core. hashlib releases the GIL while it hashes (and the
loop while OpenSSL decrypts), so on a thread the hash runs beside the loop's work: the
time to receive a 128 MiB upload fell by a tenth on a lightly loaded machine and by half
on a busy one (docs/performance.md, "Uploading a model"). Copying the chunks on the
thread as well was slower: a copy holds the GIL, so it only contended with the loop.

At most one batch of chunks is hashed at a time, in arrival order, so the digest is that
of the body as received; chunks that arrive meanwhile wait for the next batch. When more
than MAX_BACKLOG bytes wait, `feed` waits for the batch on the thread, so a hash slower
than the network leaves at most about twice MAX_BACKLOG unhashed (the batch on the
thread and the one waiting), held beside the body's own copy. Same hashlib SHA-256 over
the same bytes: only where it runs changes.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

MAX_BACKLOG: Final = 32 * 1024 * 1024
"""Bytes received but not hashed yet beyond which `feed` waits for the hash."""

_EXECUTOR: Final = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blindinfer-sha256")
"""Shared by all uploads; each upload has at most one batch on it at a time."""


class BackgroundSha256:
    """`feed` each chunk in order, then `await hexdigest()` once; `close()` if abandoned."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._running: Future[None] | None = None
        self._closed = False

    def _hash(self, batch: list[bytes]) -> None:
        """On the thread: nothing else touches the digest meanwhile."""
        for chunk in batch:
            if self._closed:
                return
            self._digest.update(chunk)

    async def feed(self, chunk: bytes) -> None:
        """Queues `chunk`, which must be immutable `bytes`: it is read later, on the thread."""
        if type(chunk) is not bytes:
            raise TypeError("only bytes can be hashed in the background")
        if not chunk:
            return
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._running is not None and not self._running.done():
            if self._pending_bytes <= MAX_BACKLOG:
                return
            await asyncio.wrap_future(self._running)
        self._submit()

    def _submit(self) -> None:
        if self._running is not None:
            self._running.result()  # done: re-raises what the thread raised, if anything
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        self._running = _EXECUTOR.submit(self._hash, batch)

    async def hexdigest(self) -> str:
        """The SHA-256 (lowercase hex) of every chunk fed, once the last batch is hashed."""
        if self._pending:
            if self._running is not None:
                await asyncio.wrap_future(self._running)
            self._submit()
        if self._running is not None:
            await asyncio.wrap_future(self._running)
            self._running.result()
        return self._digest.hexdigest()

    def close(self) -> None:
        """Drops what is not hashed yet: a batch on the thread stops at its next chunk."""
        self._closed = True
        self._pending, self._pending_bytes = [], 0
        self._running = None
