"""SealedStore.get, the read half of a reload: streamed decryption into the buffer it returns,
the SHA-256 hashed on a helper thread, nothing returned before the tag is checked.

Exact results at every chunk boundary (a small chunk size makes many chunks), the same
refusals as before for a tampered, truncated or swapped blob, the SHA-256 check even for a
blob authentic under the key (what only a leaked key could forge), and concurrent gets
sharing the hashing thread.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from blindinfer.store import sealed as sealed_module
from blindinfer.store.sealed import (
    HEADER_SIZE,
    OVERHEAD,
    ModelRecord,
    SealedDataError,
    SealedStore,
)

KEY = bytes(range(32))
CHUNK = 4096


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealed_module, "_CHUNK", CHUNK)


def _record(data: bytes, n: int = 0) -> ModelRecord:
    return ModelRecord(
        model_id=f"m-{n}-{os.urandom(8).hex()}",
        name=f"m{n}",
        sha256=hashlib.sha256(data).hexdigest(),
        owner="alice",
        size=len(data),
        created_at=1000.0 + n,
    )


def _store(d: Path) -> SealedStore:
    return SealedStore(d, KEY, max_bytes=1 << 30, verify_blobs=False)


def _blob(d: Path) -> Path:
    (path,) = (d / "blobs").glob("*.sealed")
    return path


def _put(d: Path, data: bytes) -> ModelRecord:
    record = _record(data)
    _store(d).put(record, data)
    return record


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 17, 64 * CHUNK + 5]
)
def test_round_trip_at_every_chunk_boundary(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    record = _put(tmp_path, data)
    store = _store(tmp_path)
    first, second = store.get(record.model_id), store.get(record.model_id)
    assert isinstance(first, bytearray)
    assert first == data and second == data
    assert first is not second  # each caller owns its buffer


@pytest.mark.parametrize(
    "where",
    [
        "version",
        "nonce",
        "first chunk",
        "chunk boundary",
        "last partial chunk",
        "last plaintext byte",
        "tag",
    ],
)
def test_any_flipped_byte_is_refused_with_the_existing_error(tmp_path: Path, where: str) -> None:
    data = os.urandom(5 * CHUNK + 100)
    record = _put(tmp_path, data)
    offset = {
        "version": 0,
        "nonce": 5,
        "first chunk": HEADER_SIZE,
        "chunk boundary": HEADER_SIZE + 2 * CHUNK,
        "last partial chunk": HEADER_SIZE + 5 * CHUNK + 50,
        "last plaintext byte": HEADER_SIZE + len(data) - 1,
        "tag": HEADER_SIZE + len(data) + 7,
    }[where]
    path = _blob(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    store = _store(tmp_path)
    expected = (
        f"blob {record.sha256} has an unknown format version"
        if where == "version"
        else sealed_module._blob_auth_failure(record.sha256)
    )
    with pytest.raises(SealedDataError) as caught:
        store.get(record.model_id)
    assert str(caught.value) == expected


@pytest.mark.parametrize("change", [-1, 1, -(OVERHEAD + 10)])
def test_truncated_or_grown_blob_is_refused(tmp_path: Path, change: int) -> None:
    data = os.urandom(3 * CHUNK)
    record = _put(tmp_path, data)
    store = _store(tmp_path)  # opened first: open checks the size too
    path = _blob(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:change] if change < 0 else raw + b"\0" * change)
    expected_total = len(data) + OVERHEAD
    with pytest.raises(SealedDataError) as caught:
        store.get(record.model_id)
    assert str(caught.value) == (
        f"blob {record.sha256} has {len(raw) + change} bytes, expected {expected_total}: altered"
    )


def test_an_authentic_blob_with_other_bytes_fails_the_sha256_check(tmp_path: Path) -> None:
    """Sealed under the right key and associated data (what a leaked key could forge), but
    holding other bytes than the record's SHA-256 names: the hash check still refuses it."""
    data = os.urandom(4 * CHUNK + 3)
    record = _put(tmp_path, data)
    store = _store(tmp_path)
    other = os.urandom(len(data))
    with open(_blob(tmp_path), "wb") as f:
        assert store._seal_blob(f, record.sha256, other) == hashlib.sha256(other).hexdigest()
    with pytest.raises(SealedDataError) as caught:
        store.get(record.model_id)
    assert str(caught.value) == f"the blob of model {record.model_id} does not match its SHA-256"


def test_concurrent_gets_share_the_hashing_thread(tmp_path: Path) -> None:
    store = _store(tmp_path)
    models = [os.urandom(7 * CHUNK + i) for i in range(4)]
    records = []
    for i, data in enumerate(models):
        records.append(_record(data, n=i))
        store.put(records[-1], data)
    failures: list[BaseException] = []

    def read(index: int) -> None:
        try:
            for _ in range(5):
                assert store.get(records[index].model_id) == models[index]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_a_refused_get_leaves_the_next_one_working(tmp_path: Path) -> None:
    good, bad = os.urandom(3 * CHUNK), os.urandom(3 * CHUNK)
    store = _store(tmp_path)
    rg, rb = _record(good, 1), _record(bad, 2)
    store.put(rg, good)
    store.put(rb, bad)
    blob = store._blob_path(rb.sha256)
    raw = bytearray(blob.read_bytes())
    raw[HEADER_SIZE + CHUNK] ^= 0x80
    blob.write_bytes(bytes(raw))
    with pytest.raises(SealedDataError):
        store.get(rb.model_id)
    assert store.get(rg.model_id) == good


class _ShutDown:
    """An executor after interpreter shutdown: it takes no more work."""

    def submit(self, *args: object) -> None:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")


def test_the_hash_is_still_checked_once_the_hashing_thread_takes_no_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(5 * CHUNK + 1)
    record = _put(tmp_path, data)
    store = _store(tmp_path)
    monkeypatch.setattr(sealed_module, "_HASHER", _ShutDown())
    assert store.get(record.model_id) == data
    with open(_blob(tmp_path), "wb") as f:
        store._seal_blob(f, record.sha256, os.urandom(len(data)))
    with pytest.raises(SealedDataError) as caught:
        store.get(record.model_id)
    assert str(caught.value) == f"the blob of model {record.model_id} does not match its SHA-256"
