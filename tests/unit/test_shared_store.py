"""Replicas sharing one sealed store directory (issue 12): two `SealedStore`s on one
directory, in one process and in two, and two `ModelRegistry`s above them.

One writer at a time through ``flock`` on store.lock: what one commits the other sees at
its next lookup (exact bytes), a delete on one is refused on the other, a name and a quota
are decided under the writer lock on what both committed, a temp file one holds survives
the other's open, and a manifest going back under a running store is a rollback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindinfer.runtime.workers import WorkerPool
from blindinfer.server.audit import audit_file_name, check_replica_id
from blindinfer.server.auth import TenantConfig
from blindinfer.server.config import ServerConfig
from blindinfer.server.quotas import QuotaExceededError, check_upload_against
from blindinfer.store.errors import ModelConflictError, UnknownModelError
from blindinfer.store.registry import ModelRegistry
from blindinfer.store.sealed import (
    LOCK_NAME,
    MANIFEST_NAME,
    RECORDS_DIR,
    ModelRecord,
    SealedDataError,
    SealedStore,
)
from support.onnx_models import mlp_model, model_bytes

KEY = bytes(range(32))
MiB = 1 << 20
GIB = 1 << 30


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record(model_id: str, data: bytes, name: str | None = None, owner: str = "o") -> ModelRecord:
    return ModelRecord(
        model_id=model_id,
        name=name or model_id,
        sha256=_sha(data),
        owner=owner,
        size=len(data),
        created_at=1.0,
    )


def _open(directory: Path) -> SealedStore:
    return SealedStore(directory, KEY, max_bytes=GIB)


# -- two stores in one process -----------------------------------------------------------


def test_a_put_on_one_is_read_exactly_on_the_other(tmp_path: Path) -> None:
    a, b = _open(tmp_path), _open(tmp_path)
    data = os.urandom(3 * MiB + 7)
    a.put(_record("m1", data), data)
    assert bytes(b.get("m1")) == data
    assert [r.model_id for r in b.records()] == ["m1"]
    assert b.record("m1") == a.record("m1")
    assert b.poll() == a.counter == 1


def test_a_delete_on_one_is_refused_on_the_other(tmp_path: Path) -> None:
    a, b = _open(tmp_path), _open(tmp_path)
    data = os.urandom(1000)
    a.put(_record("m1", data), data)
    assert bytes(b.get("m1")) == data
    b.delete("m1")
    with pytest.raises(UnknownModelError):
        a.get("m1")
    with pytest.raises(UnknownModelError):
        a.record("m1")
    assert a.records() == []
    with pytest.raises(UnknownModelError):  # the delete itself: decided on the fresh view
        a.delete("m1")


def test_a_mutation_starts_from_what_the_other_committed(tmp_path: Path) -> None:
    a, b = _open(tmp_path), _open(tmp_path)
    one, two = os.urandom(1000), os.urandom(2000)
    a.put(_record("m1", one), one)
    b.put(_record("m2", two), two)  # b never looked up m1: its put refreshes first
    a.update_record(
        ModelRecord("m2", "m2", _sha(two), "o", len(two), 1.0, shared_with=("t",))
    )  # a never looked up m2 either
    assert a.counter == b.poll() == 3
    assert {r.model_id for r in b.records()} == {"m1", "m2"}
    assert b.record("m2").shared_with == ("t",)
    assert _open(tmp_path).counter == 3  # and a third opens the same state


def test_the_byte_budget_holds_across_stores(tmp_path: Path) -> None:
    a = SealedStore(tmp_path, KEY, max_bytes=1500)
    b = SealedStore(tmp_path, KEY, max_bytes=1500)
    one, two = os.urandom(1000), os.urandom(1000)
    a.put(_record("m1", one), one)
    from blindinfer.store.sealed import StorageFullError

    with pytest.raises(StorageFullError):
        b.put(_record("m2", two), two)


def test_one_writer_at_a_time_decides_a_name(tmp_path: Path) -> None:
    """`writing()` is what the registry decides a name under: of two stores claiming one
    name at once, exactly one stores it."""
    stores = [_open(tmp_path), _open(tmp_path)]
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def claim(index: int) -> None:
        store = stores[index]
        data = os.urandom(2 * MiB)
        barrier.wait()
        with store.writing():
            if any(r.name == "shared" for r in store.records()):
                outcomes.append("conflict")
                return
            time.sleep(0.05)  # a slow decision: without the lock both would get through
            store.put(_record(f"m{index}", data, name="shared"), data)
            outcomes.append("stored")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["conflict", "stored"]
    assert [r.name for r in _open(tmp_path).records()] == ["shared"]


def test_a_temp_file_held_by_one_survives_the_others_open(tmp_path: Path) -> None:
    a = _open(tmp_path)
    data = os.urandom(2 * MiB)
    staged = a.stage_blob(_sha(data), data)
    b = _open(tmp_path)  # removes leftovers: not a staged blob its writer still holds
    assert staged.path.exists()
    a.put_staged(_record("m1", data), staged)
    a.discard(staged)  # what the registry does after a put_staged: a no-op now
    assert bytes(b.get("m1")) == data
    a.close()  # the writer dies before committing a second one: then it is a leftover
    c = _open(tmp_path)
    again = c.stage_blob(_sha(data), data)
    c.close()
    _open(tmp_path)
    assert not again.path.exists()


def test_a_manifest_going_back_under_a_running_store_is_a_rollback(tmp_path: Path) -> None:
    a, b = _open(tmp_path), _open(tmp_path)
    one, two = os.urandom(1000), os.urandom(1000)
    a.put(_record("m1", one), one)
    old = (tmp_path / MANIFEST_NAME).read_bytes()
    a.put(_record("m2", two), two)
    assert {r.model_id for r in b.records()} == {"m1", "m2"}  # b saw counter 2
    (tmp_path / "old").write_bytes(old)
    os.replace(tmp_path / "old", tmp_path / MANIFEST_NAME)  # the host puts counter 1 back
    with pytest.raises(SealedDataError, match=r"went back from counter 2, .* to 1: .*rolled back"):
        b.get("m1")
    with pytest.raises(SealedDataError, match="rolled back"):
        b.records()
    with pytest.raises(SealedDataError, match="rolled back"):  # and no write builds on it
        b.delete("m1")


def test_a_removed_manifest_under_a_running_store_is_a_rollback(tmp_path: Path) -> None:
    a = _open(tmp_path)
    data = os.urandom(1000)
    a.put(_record("m1", data), data)
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(SealedDataError, match=r"went back from counter 1, .* to 0"):
        a.get("m1")


def test_two_manifests_at_one_counter_mean_two_writers(tmp_path: Path) -> None:
    """Storage that ignores flock lets two replicas commit the same step: the second
    manifest at a counter a store has seen is refused, not merged or overwritten."""
    here, there = tmp_path / "here", tmp_path / "there"
    a = _open(here)
    one, two, three = os.urandom(1000), os.urandom(1000), os.urandom(1000)
    a.put(_record("m1", one), one)
    shutil.copytree(here, there, ignore=shutil.ignore_patterns(LOCK_NAME))
    a.put(_record("m2", two), two)  # counter 2 here
    other = _open(there)
    other.put(_record("m3", three), three)  # counter 2 there: a fork
    for path in (there / RECORDS_DIR).iterdir():
        shutil.copy(path, here / RECORDS_DIR / path.name)
    shutil.copy(there / MANIFEST_NAME, here / "forked")
    os.replace(here / "forked", here / MANIFEST_NAME)
    with pytest.raises(SealedDataError, match="second manifest was committed at counter 2"):
        a.records()


def test_a_changed_record_seen_in_a_refresh_is_authenticated(tmp_path: Path) -> None:
    a, b = _open(tmp_path), _open(tmp_path)
    data = os.urandom(1000)
    a.put(_record("m1", data), data)
    (tmp_path / RECORDS_DIR / "m1.1.sealed").write_bytes(b"\x01" + bytes(60))
    with pytest.raises(SealedDataError, match=r"record m1 .* fails authentication"):
        b.get("m1")


# -- two processes -------------------------------------------------------------------------

_CHILD = r"""
import hashlib, json, sys
from pathlib import Path
from blindinfer.store.errors import UnknownModelError
from blindinfer.store.sealed import ModelRecord, SealedStore

store = SealedStore(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), max_bytes=1 << 30)
staged = None
print("ready", flush=True)
for line in sys.stdin:
    command, *args = line.split()
    data = bytes.fromhex(args[-1]) if command in ("put", "claim", "stage") else b""
    record = lambda model_id, name: ModelRecord(
        model_id, name, hashlib.sha256(data).hexdigest(), "o", len(data), 1.0
    )
    try:
        if command == "put":
            store.put(record(args[0], args[0]), data)
            answer = "ok"
        elif command == "get":
            answer = hashlib.sha256(store.get(args[0])).hexdigest()
        elif command == "delete":
            store.delete(args[0])
            answer = "ok"
        elif command == "claim":
            with store.writing():
                if any(r.name == args[1] for r in store.records()):
                    answer = "conflict"
                else:
                    store.put(record(args[0], args[1]), data)
                    answer = "stored"
        elif command == "stage":
            staged = store.stage_blob(hashlib.sha256(data).hexdigest(), data)
            answer = str(staged.path)
        elif command == "commit":
            data = b"\0" * staged.size
            store.put_staged(
                ModelRecord(args[0], args[0], staged.sha256, "o", staged.size, 1.0), staged
            )
            answer = "ok"
        elif command == "records":
            answer = json.dumps(sorted(r.model_id for r in store.records()))
        else:
            break
    except UnknownModelError:
        answer = "unknown"
    except Exception as exc:
        answer = f"error {type(exc).__name__}"
    print(answer, flush=True)
"""


class Replica:
    """A store opened in another process, driven one command a line."""

    def __init__(self, directory: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(directory), KEY.hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.read() == "ready"

    def send(self, *words: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(" ".join(words) + "\n")
        self.process.stdin.flush()

    def read(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def ask(self, *words: str) -> str:
        self.send(*words)
        return self.read()

    def close(self) -> None:
        self.send("quit")
        self.process.wait(30)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Callable[[], Replica]]:
    started: list[Replica] = []

    def start() -> Replica:
        started.append(Replica(tmp_path))
        return started[-1]

    yield start
    for replica in started:
        replica.close()


def test_two_processes_see_each_others_puts_and_deletes(
    tmp_path: Path, replicas: Callable[[], Replica]
) -> None:
    a = _open(tmp_path)
    b = replicas()
    data = os.urandom(MiB + 3)
    a.put(_record("m1", data), data)
    assert b.ask("get", "m1") == _sha(data)  # the exact bytes
    theirs = os.urandom(5000)
    assert b.ask("put", "m2", theirs.hex()) == "ok"
    assert bytes(a.get("m2")) == theirs
    assert b.ask("delete", "m1") == "ok"
    with pytest.raises(UnknownModelError):
        a.get("m1")
    assert b.ask("delete", "m1") == "unknown"
    assert json.loads(b.ask("records")) == [r.model_id for r in a.records()] == ["m2"]


def test_one_name_claimed_from_three_processes_at_once_is_stored_once(
    tmp_path: Path, replicas: Callable[[], Replica]
) -> None:
    others = [replicas(), replicas()]
    a = _open(tmp_path)
    blobs = [os.urandom(4 * MiB) for _ in range(3)]
    for index, replica in enumerate(others):  # both start as soon as they read it
        replica.send("claim", f"m{index}", "shared", blobs[index].hex())
    with a.writing():
        mine = "conflict" if any(r.name == "shared" for r in a.records()) else "stored"
        if mine == "stored":
            a.put(_record("m2", blobs[2], name="shared"), blobs[2])
    outcomes = sorted([mine, *(replica.read() for replica in others)])
    assert outcomes == ["conflict", "conflict", "stored"]
    (winner,) = a.records()
    assert winner.name == "shared"
    assert bytes(a.get(winner.model_id)) == blobs[int(winner.model_id[1])]


def test_a_blob_staged_in_another_process_survives_an_open_here(
    tmp_path: Path, replicas: Callable[[], Replica]
) -> None:
    b = replicas()
    data = os.urandom(2 * MiB)
    staged = Path(b.ask("stage", data.hex()))
    assert staged.exists()
    a = _open(tmp_path)  # its leftover removal cannot lock the staged file: left alone
    assert staged.exists()
    assert b.ask("commit", "m1") == "ok"
    assert bytes(a.get("m1")) == data


def test_a_rollback_seen_by_another_process(
    tmp_path: Path, replicas: Callable[[], Replica]
) -> None:
    a = _open(tmp_path)
    b = replicas()
    one, two = os.urandom(1000), os.urandom(1000)
    a.put(_record("m1", one), one)
    old = (tmp_path / MANIFEST_NAME).read_bytes()
    a.put(_record("m2", two), two)
    assert b.ask("get", "m2") == _sha(two)
    (tmp_path / "old").write_bytes(old)
    os.replace(tmp_path / "old", tmp_path / MANIFEST_NAME)
    assert b.ask("get", "m1") == "error SealedDataError"


# -- two registries ------------------------------------------------------------------------


@functools.cache
def _mlp(seed: int) -> bytes:
    return model_bytes(mlp_model(in_features=8, hidden=16, out_features=3, seed=seed))


FEED = {"x": np.ones((1, 8), np.float32)}


@pytest.fixture(scope="module")
def pools() -> Iterator[tuple[WorkerPool, WorkerPool, list[ModelRegistry]]]:
    box: list[ModelRegistry] = []  # [registry on pool 0, registry on pool 1]
    made = [
        WorkerPool(
            workers=1,
            memory_limit_bytes=2 * GIB,
            timeout_s=20,
            intra_op_threads=1,
            source=lambda sha256, i=i: box[i].source(sha256),  # type: ignore[misc]
        )
        for i in range(2)
    ]
    yield made[0], made[1], box
    for pool in made:
        pool.close()


@pytest.fixture
def two(
    tmp_path: Path, pools: tuple[WorkerPool, WorkerPool, list[ModelRegistry]]
) -> tuple[ModelRegistry, ModelRegistry]:
    pool_a, pool_b, box = pools
    box.clear()
    for pool in (pool_a, pool_b):
        box.append(
            ModelRegistry(sealed=_open(tmp_path), pool=pool, memory_budget=GIB, max_models=100)
        )
    return box[0], box[1]


def test_an_upload_on_one_registry_runs_on_the_other(
    two: tuple[ModelRegistry, ModelRegistry],
) -> None:
    a, b = two
    data = _mlp(1)
    record, created = a.add(data, _sha(data), name="net", owner="o")
    assert created
    found = b.resolve("net", "o")
    assert found == record
    on_a, on_b = a.run(record, FEED), b.run(found, FEED)
    assert on_a.keys() == on_b.keys()
    for output in on_a:
        np.testing.assert_array_equal(on_a[output], on_b[output])
    assert [r.model_id for r in b.records()] == [record.model_id]


def test_a_delete_on_one_registry_unloads_and_refuses_on_the_other(
    two: tuple[ModelRegistry, ModelRegistry],
) -> None:
    a, b = two
    data = _mlp(2)
    record, _ = a.add(data, _sha(data), name="net", owner="o")
    b.run(b.resolve("net", "o"), FEED)
    assert b.stats().loaded == 1
    a.delete(record)
    with pytest.raises(UnknownModelError):
        b.resolve("net", "o")
    assert b.stats().loaded == 0  # its session went with the record
    with pytest.raises(UnknownModelError):
        b.run(record, FEED)  # a reference resolved before the delete
    with pytest.raises(UnknownModelError):
        b.delete(record)


def test_one_name_uploaded_on_both_registries_at_once_is_taken_once(
    two: tuple[ModelRegistry, ModelRegistry],
) -> None:
    barrier = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def upload(index: int) -> None:
        data = _mlp(10 + index)
        barrier.wait()
        try:
            outcomes[index] = two[index].add(data, _sha(data), name="net", owner="o")
        except ModelConflictError as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    stored = [o for o in outcomes if isinstance(o, tuple)]
    refused = [o for o in outcomes if isinstance(o, ModelConflictError)]
    assert (len(stored), len(refused)) == (1, 1), outcomes
    assert "is already used by another model" in str(refused[0])
    for registry in two:
        assert [r.name for r in registry.records()] == ["net"]


def test_a_tenant_quota_holds_across_registries(
    two: tuple[ModelRegistry, ModelRegistry],
) -> None:
    limits = TenantConfig("t", max_models=2)

    def admit(models: int, stored: int, new: int) -> None:
        time.sleep(0.02)  # a slow decision
        check_upload_against(limits, models, stored, new)

    a, b = two
    a.add(_mlp(20), _sha(_mlp(20)), name=None, owner="t", admit=admit)
    barrier = threading.Barrier(4)
    outcomes: list[object] = [None] * 4

    def upload(index: int) -> None:
        data = _mlp(21 + index)
        barrier.wait()
        try:
            outcomes[index] = two[index % 2].add(
                data, _sha(data), name=None, owner="t", admit=admit
            )
        except QuotaExceededError as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    stored = [o for o in outcomes if isinstance(o, tuple)]
    assert len(stored) == 1, outcomes
    assert all(isinstance(o, (tuple, QuotaExceededError)) for o in outcomes), outcomes
    assert len(a.records()) == len(b.records()) == 2


# -- replica ids (audit-<id>.log) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("replica_id", "file_name"),
    [
        (None, "audit.log"),
        ("a", "audit-a.log"),
        ("blindinfer-7d9f8c-x2x.k", "audit-blindinfer-7d9f8c-x2x.k.log"),
        ("_.-", "audit-_.-.log"),
        ("x" * 64, f"audit-{'x' * 64}.log"),
    ],
)
def test_a_replica_id_names_its_audit_log(replica_id: str | None, file_name: str) -> None:
    assert audit_file_name(replica_id) == file_name


@pytest.mark.parametrize(
    "replica_id", ["", ".", "..", ".a", "a/b", "../a", "a b", "x" * 65, "a\n", "é", "a\0"]
)
def test_a_replica_id_that_cannot_name_a_file_is_refused(replica_id: str) -> None:
    with pytest.raises(ValueError, match=r"is not 1-64 of A-Z a-z 0-9 \. _ -"):
        check_replica_id(replica_id)
    with pytest.raises(ValueError, match="replica id"):  # a config built in code too
        ServerConfig(simulation=True, replica_id=replica_id)


@given(st.text(max_size=80))
def test_an_accepted_replica_id_is_one_plain_file_name(text: str) -> None:
    try:
        name = audit_file_name(text)
    except ValueError:
        return
    assert name == f"audit-{text}.log" and os.sep not in name and not text.startswith(".")
    assert len(text) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in text)
