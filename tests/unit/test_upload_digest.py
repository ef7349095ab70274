"""BackgroundSha256 (server/upload_digest.py): the upload's SHA-256 computed on a thread
is exactly hashlib's over the chunks in order, however the body is cut; it holds at most
MAX_BACKLOG bytes unhashed; it takes only immutable bytes; close() drops the rest."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from concurrent.futures import Future

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindinfer.server import upload_digest
from blindinfer.server.upload_digest import BackgroundSha256


async def _digest(chunks: list[bytes]) -> str:
    digest = BackgroundSha256()
    try:
        for chunk in chunks:
            await digest.feed(chunk)
        return await digest.hexdigest()
    finally:
        digest.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=40))
def test_the_digest_is_hashlibs_over_the_chunks_in_order(chunks: list[bytes]) -> None:
    assert asyncio.run(_digest(chunks)) == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_large_chunks_across_many_batches() -> None:
    chunks = [bytes([i]) * (256 * 1024 + i) for i in range(64)]  # 16 MiB, uneven
    assert asyncio.run(_digest(chunks)) == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_no_chunks_is_the_empty_digest() -> None:
    assert asyncio.run(_digest([])) == hashlib.sha256(b"").hexdigest()


def test_feed_waits_for_the_thread_beyond_the_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the thread held, `feed` returns at once up to MAX_BACKLOG bytes queued and
    waits past it: the server never holds more than that unhashed."""
    monkeypatch.setattr(upload_digest, "MAX_BACKLOG", 10)
    release = threading.Event()

    def held(self: BackgroundSha256, batch: list[bytes]) -> None:
        release.wait(10)
        for chunk in batch:
            self._digest.update(chunk)

    monkeypatch.setattr(BackgroundSha256, "_hash", held)

    async def run() -> tuple[list[bool], str]:
        digest = BackgroundSha256()
        await digest.feed(b"a" * 4)  # on the thread, held there
        returned = []
        for chunk in (b"b" * 4, b"c" * 4):  # 4, then 8 bytes queued: within the backlog
            await asyncio.wait_for(digest.feed(chunk), 1)
            returned.append(True)
        third = asyncio.ensure_future(digest.feed(b"d" * 4))  # 12 > 10: waits
        await asyncio.sleep(0.05)
        returned.append(third.done())
        release.set()
        await asyncio.wait_for(third, 5)
        return returned, await digest.hexdigest()

    returned, value = asyncio.run(run())
    assert returned == [True, True, False]
    assert value == hashlib.sha256(b"aaaabbbbccccdddd").hexdigest()


@pytest.mark.parametrize("chunk", [bytearray(b"abc"), memoryview(b"abc")])
def test_only_immutable_bytes_are_taken(chunk: bytearray | memoryview) -> None:
    with pytest.raises(TypeError):
        asyncio.run(BackgroundSha256().feed(chunk))  # type: ignore[arg-type]


def test_close_stops_a_batch_at_its_next_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()
    hashed: list[bytes] = []
    original = BackgroundSha256._hash

    def slow(self: BackgroundSha256, batch: list[bytes]) -> None:
        started.set()
        release.wait(10)
        hashed.extend(batch if not self._closed else [])
        original(self, batch)

    monkeypatch.setattr(BackgroundSha256, "_hash", slow)

    async def run() -> tuple[BackgroundSha256, Future[None]]:
        digest = BackgroundSha256()
        await digest.feed(b"x" * 10)
        running = digest._running
        assert running is not None and started.wait(5)
        digest.close()
        return digest, running

    digest, running = asyncio.run(run())
    release.set()
    running.result(5)
    assert hashed == []
    assert digest._digest.hexdigest() == hashlib.sha256(b"").hexdigest()
