"""SealedStore: round trips, dedup, tamper/swap/foreign-key refusal, byte budget, recovery
from leftovers, rollback detection, crash consistency under SIGKILL, and fuzzed files."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.store import sealed as sealed_module
from blindinfer.store.errors import UnknownModelError
from blindinfer.store.keys import SIMULATION_KEY_FILE, SealingKeyFileError, simulation_sealing_key
from blindinfer.store.sealed import (
    MANIFEST_NAME,
    ModelRecord,
    SealedDataError,
    SealedStore,
    StorageFullError,
    StoreBrokenError,
    iter_sealed_files,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
MiB = 1024 * 1024


def _record(data: bytes, *, name: str = "m", owner: str = "alice", n: int = 0) -> ModelRecord:
    return ModelRecord(
        model_id=f"m-{os.urandom(16).hex()}",
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        owner=owner,
        size=len(data),
        created_at=1000.0 + n,
    )


def _open(
    d: Path,
    key: bytes = KEY,
    *,
    max_bytes: int = 64 * MiB,
    verify_blobs: bool = True,
    expected_min_counter: int = 0,
) -> SealedStore:
    return SealedStore(
        d,
        key,
        max_bytes=max_bytes,
        verify_blobs=verify_blobs,
        expected_min_counter=expected_min_counter,
    )


def _files(d: Path, sub: str) -> list[Path]:
    return sorted((d / sub).iterdir())


def _record_file(d: Path, rec: ModelRecord) -> Path:
    (path,) = (d / "records").glob(f"{rec.model_id}.*.sealed")
    return path


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= 0x01
    path.write_bytes(bytes(raw))


# -- basics ---------------------------------------------------------------------------


def test_round_trip_and_reopen(tmp_path: Path) -> None:
    store = _open(tmp_path)
    a, b = os.urandom(5000), b""
    ra, rb = _record(a, name="a", n=1), _record(b, name="b", n=2)
    store.put(ra, a)
    store.put(rb, b)
    assert store.get(ra.model_id) == a
    assert store.get(rb.model_id) == b
    assert store.record(ra.model_id) == ra
    assert store.records() == [ra, rb]
    assert store.used_bytes == 5000
    assert store.counter == 2
    # Nothing of the plaintext or the names reaches the disk in the clear.
    for path in iter_sealed_files(tmp_path):
        raw = path.read_bytes()
        assert a[:64] not in raw
        assert b"alice" not in raw
        assert ra.sha256.encode() not in raw and ra.sha256 not in path.name

    again = _open(tmp_path)
    assert again.records() == [ra, rb]
    assert again.get(ra.model_id) == a
    assert again.counter == 2
    assert again.used_bytes == 5000
    with pytest.raises(UnknownModelError):
        again.get("m-" + "0" * 32)


def test_shared_with_survives(tmp_path: Path) -> None:
    data = b"x" * 10
    rec = ModelRecord("m-1", "n", hashlib.sha256(data).hexdigest(), "o", 10, 1.5, ("bob", "eve"))
    _open(tmp_path).put(rec, data)
    assert _open(tmp_path).record("m-1") == rec


def test_put_refuses_records_that_do_not_describe_the_data(tmp_path: Path) -> None:
    store = _open(tmp_path)
    data = b"abc"
    rec = _record(data)
    with pytest.raises(ValueError, match="SHA-256"):
        store.put(replace(rec, sha256=hashlib.sha256(b"xyz").hexdigest()), data)
    with pytest.raises(ValueError, match="size"):
        store.put(replace(rec, size=4), data)
    with pytest.raises(ValueError, match="model_id"):
        store.put(replace(rec, model_id="../etc"), data)
    assert store.counter == 0
    assert store.records() == []


def test_dedup_one_blob_and_delete(tmp_path: Path) -> None:
    store = _open(tmp_path)
    data = os.urandom(3000)
    r1, r2 = _record(data, name="one", n=1), _record(data, name="two", owner="bob", n=2)
    store.put(r1, data)
    store.put(r2, data)
    assert len(_files(tmp_path, "blobs")) == 1
    assert len(_files(tmp_path, "records")) == 2
    assert store.used_bytes == 3000

    store.delete(r1.model_id)
    assert len(_files(tmp_path, "blobs")) == 1
    assert store.get(r2.model_id) == data
    with pytest.raises(UnknownModelError):
        store.get(r1.model_id)
    assert _open(tmp_path).records() == [r2]

    store.delete(r2.model_id)
    assert _files(tmp_path, "blobs") == []
    assert _files(tmp_path, "records") == []
    assert store.used_bytes == 0
    assert store.counter == 4
    assert _open(tmp_path).records() == []
    with pytest.raises(UnknownModelError):
        store.delete(r2.model_id)


def test_storage_full_with_exact_numbers(tmp_path: Path) -> None:
    store = _open(tmp_path, max_bytes=1000)
    first = os.urandom(600)
    store.put(_record(first), first)
    with pytest.raises(StorageFullError) as info:
        store.put(_record(b"y" * 401), b"y" * 401)
    message = str(info.value)
    assert "401 bytes" in message and "600 of 1000 bytes" in message and "400 are free" in message
    store.put(_record(first), first)  # already present: costs nothing
    store.put(_record(b"z" * 400), b"z" * 400)  # exactly fills the budget
    assert store.used_bytes == 1000
    assert len(store.records()) == 3


def test_concurrent_puts_and_gets(tmp_path: Path) -> None:
    store = _open(tmp_path)
    payloads = [os.urandom(1000 + i) for i in range(24)]
    records = [_record(p, n=i) for i, p in enumerate(payloads)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(k, len(payloads), 4):
                store.put(records[i], payloads[i])
                assert store.get(records[i].model_id) == payloads[i]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.counter == 24
    assert sorted(r.model_id for r in _open(tmp_path).records()) == sorted(
        r.model_id for r in records
    )


# -- tampering ------------------------------------------------------------------------


def _two_models(d: Path) -> tuple[ModelRecord, ModelRecord]:
    store = _open(d)
    a, b = os.urandom(2048), os.urandom(2048)
    ra, rb = _record(a, name="a", n=1), _record(b, name="b", n=2)
    store.put(ra, a)
    store.put(rb, b)
    return ra, rb


@pytest.mark.parametrize("offset", [0, 5, 20, -1])
def test_flipped_byte_in_blob(tmp_path: Path, offset: int) -> None:
    ra, rb = _two_models(tmp_path)
    blob = _files(tmp_path, "blobs")[0]
    _flip(blob, offset)
    with pytest.raises(SealedDataError, match="m-"):
        _open(tmp_path)
    # Without verification at open, get() finds it.
    store = _open(tmp_path, verify_blobs=False)
    failures = 0
    for rec in (ra, rb):
        try:
            store.get(rec.model_id)
        except SealedDataError:
            failures += 1
    assert failures == 1


@pytest.mark.parametrize("offset", [0, 3, 30, -1])
def test_flipped_byte_in_record(tmp_path: Path, offset: int) -> None:
    ra, _ = _two_models(tmp_path)
    _flip(_record_file(tmp_path, ra), offset)
    with pytest.raises(SealedDataError, match=ra.model_id):
        _open(tmp_path)


@pytest.mark.parametrize("offset", [0, 3, 30, -1])
def test_flipped_byte_in_manifest(tmp_path: Path, offset: int) -> None:
    _two_models(tmp_path)
    _flip(tmp_path / MANIFEST_NAME, offset)
    with pytest.raises(SealedDataError, match="manifest"):
        _open(tmp_path)


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def test_swapped_blobs(tmp_path: Path) -> None:
    _two_models(tmp_path)
    _swap(*_files(tmp_path, "blobs"))
    with pytest.raises(SealedDataError, match="fails authentication"):
        _open(tmp_path)
    store = _open(tmp_path, verify_blobs=False)
    for rec in store.records():
        with pytest.raises(SealedDataError):
            store.get(rec.model_id)


def test_swapped_records(tmp_path: Path) -> None:
    _two_models(tmp_path)
    _swap(*_files(tmp_path, "records"))
    with pytest.raises(SealedDataError, match="fails authentication"):
        _open(tmp_path)


def test_files_from_another_key_are_refused(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    ra, _ = _two_models(mine)
    data = os.urandom(2048)
    foreign = _record(data)
    _open(theirs, OTHER_KEY).put(foreign, data)
    # Their record dropped in place of one of mine.
    shutil.copy(_record_file(theirs, foreign), _record_file(mine, ra))
    with pytest.raises(SealedDataError, match=ra.model_id):
        _open(mine)
    # The whole directory under another key.
    with pytest.raises(SealedDataError, match="manifest"):
        _open(theirs, KEY)


def test_missing_record_or_blob_is_an_error_naming_it(tmp_path: Path) -> None:
    ra, rb = _two_models(tmp_path)
    saved, path = tmp_path / "saved", _record_file(tmp_path, ra)
    path.rename(saved)
    with pytest.raises(SealedDataError, match=rf"record {ra.model_id} \(version 1\) is missing"):
        _open(tmp_path)
    saved.rename(path)
    _open(tmp_path)
    for blob in _files(tmp_path, "blobs"):
        blob.unlink()
    with pytest.raises(SealedDataError, match="missing") as info:
        _open(tmp_path)
    assert ra.model_id in str(info.value) or rb.model_id in str(info.value)


# -- recovery and rollback --------------------------------------------------------------


def test_leftovers_of_an_interrupted_put_are_removed(tmp_path: Path) -> None:
    ra, rb = _two_models(tmp_path)
    manifest = tmp_path / MANIFEST_NAME
    before = manifest.read_bytes()
    store = _open(tmp_path)
    data = os.urandom(100)
    lost = _record(data)
    store.put(lost, data)
    # As if the crash came after blob and record were written, before the manifest.
    manifest.write_bytes(before)
    (tmp_path / "blobs" / ".tmp-0123").write_bytes(b"half a blob")
    (tmp_path / "records" / ".tmp-4567").write_bytes(b"half a record")
    (tmp_path / ".tmp-89ab").write_bytes(b"half a manifest")
    (tmp_path / "blobs" / ("ab" * 32 + ".sealed")).write_bytes(os.urandom(64))
    (tmp_path / "records" / "m-junk.2.sealed").write_bytes(os.urandom(64))
    (tmp_path / "records" / "not-ours.txt").write_bytes(b"left alone")

    reopened = _open(tmp_path)
    assert reopened.records() == [ra, rb]
    assert reopened.counter == 2
    assert len(_files(tmp_path, "blobs")) == 2
    assert sorted(p.name for p in _files(tmp_path, "records")) == sorted(
        [f"{ra.model_id}.1.sealed", f"{rb.model_id}.2.sealed", "not-ours.txt"]
    )
    assert not list(tmp_path.glob(".tmp-*"))
    # The same record id can be stored again afterwards.
    reopened.put(lost, data)
    assert _open(tmp_path).get(lost.model_id) == data


def test_manifest_rolled_back_under_newer_records_is_detected(tmp_path: Path) -> None:
    _two_models(tmp_path)
    manifest = tmp_path / MANIFEST_NAME
    old = manifest.read_bytes()
    store = _open(tmp_path)
    for i in range(2):
        data = os.urandom(10 + i)
        store.put(_record(data), data)
    manifest.write_bytes(old)  # counter 2; records at 3 and 4 remain
    with pytest.raises(SealedDataError, match="rolled back"):
        _open(tmp_path)


def test_update_record_and_replacing_put(tmp_path: Path) -> None:
    store = _open(tmp_path, max_bytes=1000)
    data, other = os.urandom(600), os.urandom(700)
    rec = _record(data)
    store.put(rec, data)
    shared = replace(rec, shared_with=("bob",))
    store.update_record(shared)
    assert store.record(rec.model_id) == shared
    assert [p.name for p in _files(tmp_path, "records")] == [f"{rec.model_id}.2.sealed"]
    with pytest.raises(ValueError, match="bytes"):
        store.update_record(replace(rec, size=1))
    with pytest.raises(UnknownModelError):
        store.update_record(_record(b"q"))
    # New bytes under the same id: the old blob's budget is released, its file removed.
    store.put(replace(rec, sha256=hashlib.sha256(other).hexdigest(), size=700), other)
    assert store.get(rec.model_id) == other
    assert store.used_bytes == 700
    assert len(_files(tmp_path, "blobs")) == 1
    assert _open(tmp_path).get(rec.model_id) == other


def test_record_replaced_by_an_older_version_is_detected(tmp_path: Path) -> None:
    data = os.urandom(50)
    rec = _record(data)
    store = _open(tmp_path)
    store.put(rec, data)
    v1 = _record_file(tmp_path, rec)
    v1_bytes, v1_manifest = v1.read_bytes(), (tmp_path / MANIFEST_NAME).read_bytes()
    store.update_record(replace(rec, shared_with=("bob",)))
    store.update_record(replace(rec, shared_with=("bob", "eve")))
    v3 = _record_file(tmp_path, rec)
    # The old version's bytes under the current version's name.
    v3_bytes = v3.read_bytes()
    v3.write_bytes(v1_bytes)
    with pytest.raises(SealedDataError, match="fails authentication"):
        _open(tmp_path)
    # The old version under its own name instead of the current one.
    v3.unlink()
    v1.write_bytes(v1_bytes)
    with pytest.raises(SealedDataError, match=r"version 3\) is missing"):
        _open(tmp_path)
    # Plus the old manifest, with the newer version still present: a newer manifest existed.
    (tmp_path / MANIFEST_NAME).write_bytes(v1_manifest)
    v3.write_bytes(v3_bytes)
    with pytest.raises(SealedDataError, match="rolled back"):
        _open(tmp_path)
    # All files consistently rolled back: authentic, and not detectable without a counter.
    v3.unlink()
    assert _open(tmp_path).records() == [rec]
    assert _open(tmp_path).counter == 1
    with pytest.raises(SealedDataError, match="trusted counter"):
        _open(tmp_path, expected_min_counter=3)


def test_interrupted_update_keeps_the_committed_version(tmp_path: Path) -> None:
    data = os.urandom(50)
    rec = _record(data)
    store = _open(tmp_path)
    store.put(rec, data)
    v1 = _record_file(tmp_path, rec)
    v1_bytes, before = v1.read_bytes(), (tmp_path / MANIFEST_NAME).read_bytes()
    store.update_record(replace(rec, shared_with=("bob",)))
    # As if the crash came after the new version's record, before the manifest's rename
    # (so before the old version's file was removed).
    (tmp_path / MANIFEST_NAME).write_bytes(before)
    v1.write_bytes(v1_bytes)
    reopened = _open(tmp_path)
    assert reopened.records() == [rec]
    assert [p.name for p in _files(tmp_path, "records")] == [v1.name]


def test_trusted_counter_refuses_older_manifest(tmp_path: Path) -> None:
    _two_models(tmp_path)
    assert _open(tmp_path, expected_min_counter=2).counter == 2
    with pytest.raises(SealedDataError, match="trusted counter"):
        _open(tmp_path, expected_min_counter=3)
    with pytest.raises(SealedDataError, match="trusted counter"):
        _open(tmp_path / "empty", expected_min_counter=1)


# -- crash consistency ----------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import dataclasses, hashlib, os, random, sys
    from pathlib import Path
    from blindinfer.store.sealed import ModelRecord, SealedStore

    directory, key, iteration = Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3])
    store = SealedStore(directory, key, max_bytes=1 << 30)
    rng = random.Random(iteration)
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        seed = iteration * 100000 + n
        live = store.records()
        if live and rng.random() < 0.2:
            victim = rng.choice(live).model_id
            print("d", victim, flush=True)  # intent: this delete may commit unacknowledged
            store.delete(victim)
            print("D", victim, flush=True)
            continue
        if live and rng.random() < 0.2:
            target = rng.choice(live)
            print("u", target.model_id, n, flush=True)  # intent, as for deletes
            store.update_record(dataclasses.replace(target, shared_with=(f"t{n}",)))
            print("U", target.model_id, n, flush=True)
            continue
        if live and rng.random() < 0.15:
            seed = int(rng.choice(live).name)  # same bytes again: dedup path
        data = random.Random(seed).randbytes(random.Random(seed).randint(0, 300_000))
        rec = ModelRecord(
            model_id="m-" + os.urandom(16).hex(), name=str(seed),
            sha256=hashlib.sha256(data).hexdigest(), owner="o", size=len(data),
            created_at=float(n),
        )
        store.put(rec, data)
        print("P", rec.model_id, seed, flush=True)
    """
)


def _payload(seed: int) -> bytes:
    return random.Random(seed).randbytes(random.Random(seed).randint(0, 300_000))


def test_sigkill_at_random_moments_never_loses_or_half_writes(tmp_path: Path) -> None:
    rng = random.Random(1234)
    acknowledged: dict[str, int] = {}  # model_id -> seed
    shares: dict[str, tuple[str, ...]] = {}  # model_id -> acknowledged shared_with
    deleted: set[str] = set()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    for iteration in range(15):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path), KEY.hex(), str(iteration)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL
        in_flight_delete = None
        in_flight_update: tuple[str, tuple[str, ...]] | None = None
        for line in out.decode().splitlines():
            # A line cut by the kill is incomplete: its operation may or may not have committed.
            parts = line.split()
            if len(parts) < 2 or len(parts[1]) != 34:
                continue
            if parts[0] == "P" and len(parts) == 3:
                acknowledged[parts[1]] = int(parts[2])
            elif parts[0] == "D":
                deleted.add(parts[1])
                in_flight_delete = None
            elif parts[0] == "d":
                in_flight_delete = parts[1]
            elif parts[0] == "U" and len(parts) == 3:
                shares[parts[1]] = (f"t{parts[2]}",)
                in_flight_update = None
            elif parts[0] == "u" and len(parts) == 3:
                in_flight_update = (parts[1], (f"t{parts[2]}",))

        store = _open(tmp_path, max_bytes=1 << 30)
        visible = {r.model_id: r for r in store.records()}
        expected = set(acknowledged) - deleted
        missing = expected - set(visible)
        # Only the delete in flight when killed may have committed without its "D" line.
        assert missing <= {in_flight_delete}, f"iteration {iteration}: lost {missing}"
        deleted |= missing
        assert not (deleted & set(visible)), f"iteration {iteration}: deletes undone"
        unacknowledged = set(visible) - expected
        # ...or the put in flight: one operation at most, complete or absent.
        assert len(unacknowledged) + len(missing) <= 1
        for model_id, rec in visible.items():
            data = store.get(model_id)
            assert hashlib.sha256(data).hexdigest() == rec.sha256
            if model_id in acknowledged:
                assert data == _payload(acknowledged[model_id])
        for model_id in unacknowledged:  # committed just before the kill: keep tracking it
            acknowledged[model_id] = int(visible[model_id].name)
        updated_unacknowledged = 0
        for model_id, rec in visible.items():
            if rec.shared_with != shares.get(model_id, ()):
                assert in_flight_update == (model_id, rec.shared_with), f"{iteration}: {rec}"
                updated_unacknowledged += 1
            shares[model_id] = rec.shared_with
        assert len(unacknowledged) + len(missing) + updated_unacknowledged <= 1
        assert not list(tmp_path.rglob(".tmp-*"))
        referenced = {rec.sha256 for rec in visible.values()}
        assert len(_files(tmp_path, "blobs")) == len(referenced)
        assert len(_files(tmp_path, "records")) == len(visible)
        del store
    assert len(acknowledged) >= 15


# -- fuzzing ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("template")
    store = _open(d)
    for i, data in enumerate([os.urandom(700), os.urandom(300), b""]):
        store.put(_record(data, n=i), data)
    dup = _record(store.get(store.records()[0].model_id), n=9)
    store.put(dup, store.get(store.records()[0].model_id))
    return d


_mutations = st.one_of(
    st.tuples(st.just("replace"), st.binary(max_size=2000)),
    st.tuples(st.just("flip"), st.integers(0, 10_000)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=40)),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(which=st.integers(0, 100), mutation=_mutations)
def test_arbitrary_bytes_in_any_sealed_file_only_raise_sealed_data_error(
    template: Path, which: int, mutation: tuple[str, object]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "store"
        shutil.copytree(template, d)
        files = list(iter_sealed_files(d))
        target = files[which % len(files)]
        original = target.read_bytes()
        kind, arg = mutation
        if kind == "replace":
            assert isinstance(arg, bytes)
            new = arg
        elif kind == "flip":
            assert isinstance(arg, int)
            raw = bytearray(original)
            raw[arg % len(raw)] ^= 1 << (arg % 8)
            new = bytes(raw)
        elif kind == "truncate":
            assert isinstance(arg, int)
            new = original[: arg % len(original)]
        else:
            assert isinstance(arg, bytes)
            new = original + arg
        target.write_bytes(new)
        if new == original:
            _open(d)
        else:
            with pytest.raises(SealedDataError):
                _open(d)


# -- simulation key -------------------------------------------------------------------------


def test_simulation_key_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="blindinfer.store.keys"):
        key = simulation_sealing_key(tmp_path / "state")
    path = tmp_path / "state" / SIMULATION_KEY_FILE
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "protects NOTHING against the host" in caplog.text
    assert simulation_sealing_key(tmp_path / "state") == key
    assert list((tmp_path / "state").iterdir()) == [path]
    store = _open(tmp_path / "models", key)
    store.put(_record(b"m"), b"m")

    path.write_bytes(b"short")
    with pytest.raises(SealingKeyFileError, match="5 bytes"):
        simulation_sealing_key(tmp_path / "state")


def test_committed_at_comes_from_the_injected_clock(tmp_path: Path) -> None:
    store = SealedStore(tmp_path, KEY, max_bytes=100, clock=lambda: 1234.5)
    assert store.committed_at == 0.0
    store.put(_record(b"abc"), b"abc")
    assert store.committed_at == 1234.5
    assert _open(tmp_path).committed_at == 1234.5


def test_failed_write_before_the_commit_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _open(tmp_path)
    kept = os.urandom(100)
    rk = _record(kept)
    store.put(rk, kept)
    real_replace = os.replace

    def failing_replace(src: Path, dst: Path) -> None:
        if Path(dst).name == MANIFEST_NAME:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    data = os.urandom(100)
    with pytest.raises(OSError, match="No space"):
        store.put(_record(data), data)
    monkeypatch.setattr(os, "replace", real_replace)
    assert store.records() == [rk] and store.counter == 1 and store.used_bytes == 100
    assert len(_files(tmp_path, "blobs")) == 1 and len(_files(tmp_path, "records")) == 1
    assert not list(tmp_path.rglob(".tmp-*"))
    store.put(_record(data), data)  # still usable
    assert len(_open(tmp_path).records()) == 2


def test_failed_fsync_after_the_rename_requires_a_reopen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _open(tmp_path)
    data = os.urandom(100)
    rec = _record(data)

    def failing_fsync_dir(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sealed_module, "_fsync_dir", failing_fsync_dir)
    with pytest.raises(OSError, match="Input/output"):
        store.put(rec, data)
    monkeypatch.undo()
    with pytest.raises(StoreBrokenError, match="reopened"):
        store.put(rec, data)
    with pytest.raises(StoreBrokenError):
        store.delete(rec.model_id)
    _open(tmp_path)  # whatever reached the disk is consistent
