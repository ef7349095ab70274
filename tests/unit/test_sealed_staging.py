"""Uploads seal while their model is validated (issue 11): `SealedStore.stage_blob` +
`put_staged`, what the registry does with them, and the worker's model-frame reader.

Each test performs the failure it guards against: a wrong hash, a refused upload, a crash
between staging and commit, a frame followed by another on the same pipe.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blindinfer.runtime.errors import InvalidModelError
from blindinfer.runtime.workers import WorkerPool, _recv_payload
from blindinfer.store.registry import ModelRegistry
from blindinfer.store.sealed import (
    BLOBS_DIR,
    TMP_PREFIX,
    ModelRecord,
    SealedStore,
    StagingCancelledError,
    StorageFullError,
)
from support.onnx_models import mlp_model, model_bytes

KEY = bytes(range(32))
MiB = 1 << 20


def _record(data: bytes, model_id: str = "m-1") -> ModelRecord:
    return ModelRecord(
        model_id=model_id,
        name="m",
        sha256=hashlib.sha256(data).hexdigest(),
        owner="alice",
        size=len(data),
        created_at=1000.0,
    )


def _blob_files(d: Path) -> list[str]:
    return sorted(p.name for p in (d / BLOBS_DIR).iterdir())


def test_a_staged_blob_commits_and_reads_back_after_reopen(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)  # several sealing chunks and a partial one
    store = SealedStore(tmp_path, KEY, max_bytes=64 * MiB)
    record = _record(data)
    staged = store.stage_blob(record.sha256, data)
    assert staged.path.name.startswith(TMP_PREFIX)
    store.put_staged(record, staged)
    store.discard(staged)  # a no-op once renamed into place
    assert [n for n in _blob_files(tmp_path) if n.startswith(TMP_PREFIX)] == []
    assert store.get(record.model_id) == data
    assert SealedStore(tmp_path, KEY, max_bytes=64 * MiB).get(record.model_id) == data


def test_a_wrong_sha256_is_refused_while_sealing_and_leaves_nothing(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    store = SealedStore(tmp_path, KEY, max_bytes=64 * MiB)
    with pytest.raises(ValueError, match="SHA-256"):
        store.stage_blob(hashlib.sha256(b"other bytes").hexdigest(), data)
    assert _blob_files(tmp_path) == []


def test_a_staged_blob_cannot_be_committed_under_another_record(tmp_path: Path) -> None:
    data, other = os.urandom(MiB), os.urandom(MiB)
    store = SealedStore(tmp_path, KEY, max_bytes=64 * MiB)
    staged = store.stage_blob(hashlib.sha256(data).hexdigest(), data)
    with pytest.raises(ValueError, match="staged blob"):
        store.put_staged(_record(other), staged)
    store.discard(staged)
    assert store.records() == [] and _blob_files(tmp_path) == []


def test_the_byte_budget_still_holds_for_staged_blobs(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    store = SealedStore(tmp_path, KEY, max_bytes=MiB)
    staged = store.stage_blob(hashlib.sha256(data).hexdigest(), data)
    with pytest.raises(StorageFullError):
        store.put_staged(_record(data), staged)
    store.discard(staged)
    assert store.records() == [] and _blob_files(tmp_path) == []


def test_cancelled_sealing_stops_and_leaves_nothing(tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    store = SealedStore(tmp_path, KEY, max_bytes=64 * MiB)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(StagingCancelledError):
        store.stage_blob(hashlib.sha256(data).hexdigest(), data, cancel=cancel)
    assert _blob_files(tmp_path) == []


def test_a_crash_between_staging_and_commit_leaves_nothing_after_reopen(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    store = SealedStore(tmp_path, KEY, max_bytes=64 * MiB)
    store.stage_blob(hashlib.sha256(data).hexdigest(), data)  # never committed: "crash"
    assert len(_blob_files(tmp_path)) == 1
    store.close()  # the process ends: its staged file's lock goes with it
    reopened = SealedStore(tmp_path, KEY, max_bytes=64 * MiB)
    assert reopened.records() == [] and _blob_files(tmp_path) == []


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(
        workers=1,
        memory_limit_bytes=2 << 30,
        timeout_s=10,
        intra_op_threads=1,
        source=lambda key: b"",
    ) as pool:
        yield pool


def test_an_upload_refused_by_validation_leaves_no_staged_file(
    pool: WorkerPool, tmp_path: Path
) -> None:
    sealed = SealedStore(tmp_path, secrets.token_bytes(32), max_bytes=1 << 30)
    registry = ModelRegistry(sealed=sealed, pool=pool, memory_budget=1 << 30, max_models=8)
    junk = os.urandom(8 * MiB)  # not ONNX: the worker refuses it, sealing is under way
    with pytest.raises(InvalidModelError):
        registry.add(junk, hashlib.sha256(junk).hexdigest(), name="junk", owner="alice")
    assert _blob_files(tmp_path) == [] and sealed.records() == []
    good = model_bytes(mlp_model(seed=3))
    record, created = registry.add(good, hashlib.sha256(good).hexdigest(), name="ok", owner="a")
    assert created and sealed.get(record.model_id) == good
    assert [n for n in _blob_files(tmp_path) if n.startswith(TMP_PREFIX)] == []


def test_the_model_frame_reader_keeps_the_pipe_in_step() -> None:
    """`_recv_payload` reads exactly one `send_bytes` frame: the frames around it (a
    header before, the next command after) still arrive whole through Connection."""
    ours, theirs = multiprocessing.Pipe(duplex=True)
    big = os.urandom(8 * MiB + 3)

    def send() -> None:
        for frame in (b"header", big, b"", b"next"):
            ours.send_bytes(frame)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert theirs.recv_bytes() == b"header"
        assert _recv_payload(theirs) == big
        assert _recv_payload(theirs) == b""
        assert theirs.recv_bytes() == b"next"
    finally:
        sender.join()
        ours.close()
        theirs.close()


def test_the_model_frame_reader_reports_a_closed_pipe() -> None:
    ours, theirs = multiprocessing.Pipe(duplex=True)
    ours.send_bytes(os.urandom(1024))  # one whole frame, then the worker's peer is gone
    ours.close()
    assert len(_recv_payload(theirs)) == 1024
    with pytest.raises(EOFError):
        _recv_payload(theirs)
    theirs.close()
