"""Sealed, crash-safe model storage on the host's disk.

Why it exists: BlindAI Core kept every uploaded model in enclave memory, and its audit
found that uploads could exhaust it. `SealedStore` keeps model bytes outside the enclave,
encrypted and authenticated under keys derived from the TEE's sealing key, and reloads
them on demand; the directory survives restarts of the same enclave identity.

The host sees and may change every byte of the directory, so everything read back is
authenticated, and anything unexpected is refused with `SealedDataError` rather than
silently repaired: an acknowledged model is never dropped without an error.

On-disk layout (all under `directory`, mode 0700)::

    manifest.sealed                      the commit point: every live model_id with its
                                         sha256, owner, name and record version, plus this
                                         manifest's counter and the previous one
    records/<model_id>.<counter>.sealed  one `ModelRecord` as JSON, the version written
                                         when the manifest went to <counter>
    blobs/<tag>.sealed                   model bytes, ONE file per distinct content, whoever
                                         uploaded it; <tag> = HMAC-SHA256(name key, sha256),
                                         so file names do not let the host confirm a guess
                                         of which (public) model was uploaded
    store.lock                           flock()ed by every mutation: one writer at a
                                         time across the replicas sharing the directory
    */.tmp-*                             a write in progress, flock()ed by its writer
                                         (removed at open once no writer holds it)

Every sealed file is ``version (1 byte) || nonce (12) || AES-256-GCM ciphertext || tag (16)``
with a fresh random nonce per write. Keys come from HKDF-SHA256 over the sealing key, one
per purpose (blob, record, manifest, file names), so no file can be read as another kind.
Associated data binds each file to where it must be: a blob to its SHA-256 (a blob file
swapped for another fails authentication), a record to its model_id and version counter
(a record file swapped for another, or for an older version of itself, fails), the
manifest to a fixed label. A record's owner, name and sha256 are inside its authenticated
plaintext and must equal the manifest's entry, which binds them just as firmly as
associated data would; keeping them out of the associated data lets recovery authenticate
a record the manifest does not list, knowing only its file name (see rollback below).

Writes are durable before `put`/`delete` return: temp file, fsync, `os.replace`, fsync of
the directory. `put` writes blob, then record, then manifest; `delete` writes the manifest
first, then removes record and (unreferenced) blob. Replacing the manifest is the single
commit point, so after a crash at any moment the store reopens to either the old or the
new state; files the manifest does not list are leftovers and are removed at open. A
record is never overwritten in place (a new version gets a new file name), so a crash
while updating one cannot leave the manifest pointing at the wrong version.

Each mutation takes a `before_commit` callback, called once everything but the manifest's
rename is durable (the new manifest fsynced under a temporary name): the registry writes
its audit entry there, so that an operation whose audit record cannot be written is
refused with nothing changed (write-ahead: a crash between the two leaves an entry for an
operation that did not commit, never a committed operation without its entry).

Replicas sharing one directory (docs/operations.md, "Replicas sharing one store"): any
number of processes, on one machine or several, may open one directory under one key.
One writer at a time, through the store itself: every mutation holds ``flock(LOCK_EX)``
on ``store.lock`` (besides this process's thread lock) from before it reads the manifest
until after its commit and clean-up, and first re-reads the manifest, authenticating what
changed as open does. Whatever a caller checks inside `writing()` (a name is free, a quota
has room) therefore still holds when its mutation commits there, on every replica.
Readers (`get`, `record`, `records`, `poll`) stat the manifest before a lookup (inode,
size, mtime: microseconds) and re-read it under ``LOCK_SH`` only when that changed, so a
model another replica committed or deleted is seen at the next lookup. A refresh checks
each record it has not seen yet and that each new blob exists with its size; the blob's
bytes are authenticated by `get`, as always. Temp files are created ``flock``ed by their
writer and stay locked until renamed or removed (a staged blob too, until `put_staged` or
`discard`): open removes only those it can lock itself, and unreferenced records and
blobs only under the exclusive lock, where no writer is between its first write and its
commit. Open's full authentication of the blobs (`verify_blobs`) runs under the shared
lock: writers wait for it, other replicas' readers do not.

Deleting on a full disk. A delete frees space only after its commit, and the commit is a
new manifest, which needs space first; freeing first (unlinking the blob or record) would
break the invariants above (a crash would leave a manifest naming missing files, which
open must refuse as a rollback). So the store keeps ``space.reserve``, a file of zeros
allocated (``posix_fallocate``) to at least twice the manifest's size: a `put` that cannot
grow it is refused, and a delete that hits ENOSPC unlinks it, commits (its manifest is
smaller than the current one; the rest is room for the audit entry) and allocates it again
once the deleted model's files are gone. The reserve means nothing to recovery: open
recreates it as it can.

Rollback (the host presenting older files than the ones the enclave wrote).
Detected at open:
  * a record file replaced by an older (or any other) version of itself: its associated
    data names the version, and the manifest names the version it expects;
  * a manifest rolled back while newer record files remain: an unreferenced record
    written at a counter above ``manifest counter + 1`` proves a newer manifest existed
    (an interrupted write leaves at most ``manifest counter + 1``);
  * a manifest rolled back across a delete or an update whose superseded files are gone:
    the record version or blob it lists is missing;
  * with ``expected_min_counter`` from a trusted monotonic counter: any manifest older
    than that.
Detected while running (a refresh: another replica's commit, or the host's doing):
  * a manifest older than the newest this process has seen (a lower counter), or one
    missing once a manifest existed;
  * another manifest at the counter this process last saw: two writers committed the same
    step, which only happens where the storage does not honour ``flock``.
Not detected without a hardware (or otherwise trusted) monotonic counter, and there is
no way around this in software alone:
  * the whole directory restored consistently to an earlier snapshot while the server is
    down (including "deleted entirely", which looks like a new store): every file in it
    is authentic, and nothing inside the enclave remembers that a newer state existed;
  * a rollback of exactly the last mutation whose files are still there: its record
    (counter = manifest + 1) is indistinguishable from a crash before the manifest was
    replaced, so it is removed as a leftover;
  * a manifest rollback combined with deleting the newer record files.
`counter` is the manifest counter; a deployment with a trusted counter should store it
after each mutation and pass it back as ``expected_min_counter``.

What the host still learns: the number of models, each distinct model's size (ciphertext
length), when uploads, updates and deletes happen, and whether an upload reused a blob.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindinfer.errors import BlindInferError, causes
from blindinfer.store.errors import UnknownModelError

_log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
"""First byte of every sealed file; a different value is refused, never guessed at."""

NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
HEADER_SIZE: Final = 1 + NONCE_SIZE
OVERHEAD: Final = HEADER_SIZE + TAG_SIZE
"""Bytes a sealed file has beyond its plaintext."""

MAX_BLOB_BYTES: Final = 2**31 - 1 - TAG_SIZE
"""One model's size limit: `AESGCM` takes at most 2**31 - 1 bytes (ciphertext + tag), and
ONNX protobufs cannot exceed 2 GiB anyway."""

MAX_RECORD_FILE: Final = 64 * 1024
MAX_MANIFEST_FILE: Final = 64 * 1024 * 1024
"""Bounds on what is read before authentication, so a hostile file cannot exhaust memory."""

_CHUNK: Final = 1024 * 1024
"""Blobs are encrypted and decrypted in chunks: peak memory stays near one model copy."""

_HASHER: Final = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blindinfer-unseal-hash")
"""Hashes a blob's plaintext chunks while `SealedStore._read_blob` decrypts the next ones
(its thread starts at first use)."""

MANIFEST_NAME: Final = "manifest.sealed"
LOCK_NAME: Final = "store.lock"
RESERVE_NAME: Final = "space.reserve"
RESERVE_MIN: Final = 256 * 1024
"""Smallest reserve kept for deletes on a full disk (room for a manifest of ~1000 models
and the delete's audit entry); it grows to twice the manifest's size."""
BLOBS_DIR: Final = "blobs"
RECORDS_DIR: Final = "records"
SUFFIX: Final = ".sealed"
TMP_PREFIX: Final = ".tmp-"

_KDF_INFO: Final = {
    "blob": b"blindinfer sealed-store v1 blob key",
    "record": b"blindinfer sealed-store v1 record key",
    "manifest": b"blindinfer sealed-store v1 manifest key",
    "name": b"blindinfer sealed-store v1 blob file-name key",
}
_AAD_BLOB: Final = b"blindinfer/sealed-store/v1/blob\0"
_AAD_RECORD: Final = b"blindinfer/sealed-store/v1/record\0"
_AAD_MANIFEST: Final = b"blindinfer/sealed-store/v1/manifest"

_MODEL_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
"""model_ids become file names: no dots, no separators, bounded length."""
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_BLOB_FILE: Final = re.compile(r"[0-9a-f]{64}\.sealed")
_RECORD_FILE: Final = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]{0,127})\.([0-9]{1,19})\.sealed")


class SealedStoreError(BlindInferError):
    """Base of the sealed store's refusals."""


class SealedDataError(SealedStoreError):
    """A sealed file is missing, altered, swapped, rolled back or sealed under another key."""


class StagingCancelledError(SealedStoreError):
    """`stage_blob` stopped because its upload was refused meanwhile (never reaches a
    client: the refusal that cancelled it does)."""


class StorageFullError(SealedStoreError):
    """Storing the model would exceed the store's byte budget."""


def is_disk_full(exc: BaseException) -> bool:
    """True if `exc` or what caused it is ENOSPC / EDQUOT (no room on the store's disk)."""
    return any(
        isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in causes(exc)
    )


class StoreBrokenError(SealedStoreError):
    """A durable write failed half-way (after a rename): the store must be reopened.

    After a failed fsync the on-disk state is uncertain (the kernel may have dropped the
    dirty pages), so continuing to mutate from the in-memory view could commit a manifest
    that disagrees with the disk. Reopening re-derives the state from what is on disk.
    """


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """What the store knows about one model, besides its bytes."""

    model_id: str
    name: str
    sha256: str
    owner: str
    size: int
    created_at: float
    shared_with: tuple[str, ...] = ()
    kind: str = "tensor"
    """"tensor" (one ONNX file) or "generative" (an onnxruntime-genai folder archive);
    records written before generative models existed have none and read as "tensor"."""


@dataclass(frozen=True, slots=True)
class _Entry:
    """A live model: its record and the manifest counter that committed it."""

    record: ModelRecord
    counter: int


@dataclass(frozen=True, slots=True)
class _Listed:
    """One model as the manifest lists it: what its record file must agree with."""

    model_id: str
    sha256: str
    owner: str
    name: str
    counter: int


@dataclass(frozen=True, slots=True)
class StagedBlob:
    """A model's bytes already sealed to a temporary file of blobs/ and fsynced, their
    SHA-256 checked while sealing (`SealedStore.stage_blob`): `put_staged` only renames
    it into place. Nothing references it until then; open removes it after a crash."""

    sha256: str
    size: int
    path: Path


def _derive(sealing_key: bytes, purpose: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KDF_INFO[purpose])
    return hkdf.derive(sealing_key)


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable (the file's own fsync does not)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(directory: Path) -> Path:
    return directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"


_Identity = tuple[int, int, int] | None


def _identity(path: Path | str) -> _Identity:
    """What a reader compares to notice another replica's commit without reading the
    file: (inode, size, mtime). Every commit renames a new file over the manifest, so its
    inode changes; None while there is no manifest."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not removed or replaced)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _close_all(lock_fd: int, tmps: dict[Path, int], tmps_lock: threading.Lock) -> None:
    """`SealedStore.close`: every descriptor the store holds, so every flock it holds."""
    with tmps_lock:
        fds = list(tmps.values())
        tmps.clear()
    for fd in (lock_fd, *fds):
        with contextlib.suppress(OSError):
            os.close(fd)


def _remove_stale_tmps(directory: Path, skip: Callable[[Path], bool]) -> None:
    """Removes the temp files of `directory` that no writer holds: each live one is
    ``flock``ed by its writer (`SealedStore._create_tmp`), in this process or in another
    replica, so one this can lock without waiting is left over by a writer that died."""
    for tmp in directory.glob(f"{TMP_PREFIX}*"):
        if skip(tmp):
            continue  # this store's own write in progress
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # gone already, or not a file this store writes
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: another replica is writing it
            if _same_file(fd, tmp):
                _log.info(
                    "removing %s/%s: left over by an interrupted write", directory.name, tmp.name
                )
                tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The file's bytes, refusing more than `limit` before reading them into memory."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise SealedDataError(f"{what} is missing ({path.name})") from None
    if len(data) > limit:
        raise SealedDataError(f"{what} is larger than {limit} bytes: not written by this store")
    return data


def _record_to_json(record: ModelRecord, counter: int) -> bytes:
    body: dict[str, Any] = asdict(record)
    body["shared_with"] = list(record.shared_with)
    body["counter"] = counter
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _record_from_json(data: bytes) -> tuple[ModelRecord, int]:
    """Parse an authenticated record; a malformed one is still refused, not trusted."""
    try:
        body = json.loads(data)
        record = ModelRecord(
            model_id=_str(body["model_id"]),
            name=_str(body["name"]),
            sha256=_str(body["sha256"]),
            owner=_str(body["owner"]),
            size=_int(body["size"]),
            created_at=float(body["created_at"]),
            shared_with=tuple(_str(s) for s in body["shared_with"]),
            kind=_kind(body.get("kind", "tensor")),
        )
        return record, _int(body["counter"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SealedDataError(f"a record is malformed: {type(exc).__name__}") from None


MODEL_KINDS = ("tensor", "generative")


def _kind(value: object) -> str:
    if value not in MODEL_KINDS:
        raise ValueError("unknown model kind")
    return str(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("expected a non-negative integer")
    return value


class SealedStore:
    """Models sealed on disk, deduplicated by content, durable and crash-consistent.

    Processes (replicas) may share a directory: one writer at a time, through ``flock`` on
    ``store.lock`` (module docstring). Mutations hold the lock for their whole duration,
    including the blob's encryption and fsyncs: simple, and uploads are rare next to
    inference. `get` takes the lock only to
    look the model up and open its blob, then decrypts outside it; an open file keeps its
    content even if a concurrent `delete` unlinks it.
    """

    def __init__(
        self,
        directory: Path,
        sealing_key: bytes,
        *,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        expected_min_counter: int = 0,
        verify_blobs: bool = True,
    ) -> None:
        """Open (or create) the store at `directory` and recover from any interrupted write.

        `expected_min_counter` comes from a trusted monotonic counter, if the deployment
        has one: a manifest older than it is a rollback. `verify_blobs` authenticates every
        blob at open (streaming, O(1 MiB) memory, costs a full read of the store); with
        False, open checks only that each blob exists with the right size, and tampering is
        found by `get`.
        """
        if not isinstance(sealing_key, bytes) or len(sealing_key) != 32:
            raise ValueError("the sealing key must be 32 bytes")
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self._dir = Path(directory)
        self._blobs_dir = self._dir / BLOBS_DIR
        self._records_dir = self._dir / RECORDS_DIR
        self._max_bytes = max_bytes
        self._clock = clock
        self._blob_key = _derive(sealing_key, "blob")
        self._blob_aead = AESGCM(self._blob_key)
        self._record_aead = AESGCM(_derive(sealing_key, "record"))
        self._manifest_aead = AESGCM(_derive(sealing_key, "manifest"))
        self._name_key = _derive(sealing_key, "name")
        # the thread lock, then the flock of store.lock (`_locked`); re-entrant, so that
        # a mutation inside `writing()` runs under the lock its caller took
        self._lock = threading.RLock()
        self._flock_mode: int | None = None  # LOCK_EX or LOCK_SH while held (under _lock)
        self._manifest_seen: _Identity = None  # the manifest file this view was read from
        self._manifest_file = os.fspath(self._dir / MANIFEST_NAME)  # stat()ed per lookup
        self._manifest_digest = b""  # SHA-256 of its bytes (b"": none)
        self._own_tmps: dict[Path, int] = {}  # this store's temp files -> their locked fd
        self._tmps_lock = threading.Lock()
        self._broken: str | None = None
        self._entries: dict[str, _Entry] = {}
        self._blob_sizes: dict[str, int] = {}  # sha256 -> size, for every live blob
        self._refs: dict[str, int] = {}  # sha256 -> number of records using it
        self._counter = 0
        self._committed_at = 0.0
        self._manifest_size = 0  # bytes of the current manifest file
        self._reserve_size = 0  # bytes allocated to space.reserve
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(
            self._dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )  # read-write: NFS emulates flock with POSIX locks, which need it
        self._finalizer = weakref.finalize(
            self, _close_all, self._lock_fd, self._own_tmps, self._tmps_lock
        )
        with self._locked(exclusive=True):
            self._open(expected_min_counter)
        if verify_blobs:  # shared: writers wait meanwhile, readers elsewhere go on
            with self._locked(exclusive=False):
                self._refresh_locked()  # what was committed since
                self._check_blobs(self._entries, self._blob_sizes, verify=True, checked={})

    # -- public API ---------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    def close(self) -> None:
        """Releases store.lock and this store's temp files' locks, as the process's exit
        does (and garbage collection): a staged blob never committed is then a leftover
        that the next open removes. The store is unusable afterwards."""
        self._finalizer()

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def used_bytes(self) -> int:
        """Sum of the sizes of distinct stored models (what `max_bytes` limits).

        Per-file overhead (29 bytes per sealed file, records, manifest) is not counted:
        the budget is about model bytes, which dominate by orders of magnitude.
        """
        with self._lock:
            return sum(self._blob_sizes.values())

    @property
    def committed_at(self) -> float:
        """`clock()` when the current manifest was written (0.0 for an empty new store).

        Informational, from the host's clock, which the TEE does not trust: it helps an
        operator date a rollback error, and is never used to decide one.
        """
        with self._lock:
            return self._committed_at

    @property
    def counter(self) -> int:
        """The current manifest's counter: +1 per committed put or delete, never lower."""
        with self._lock:
            return self._counter

    def put(
        self, record: ModelRecord, data: bytes, *, before_commit: Callable[[], object] | None = None
    ) -> None:
        """Store `data` under `record`; durable on disk when this returns.

        Checks that the record describes `data` (size and SHA-256: the hash is the
        deduplication key, so a wrong one would serve other bytes under it). Raises
        `StorageFullError` if a new blob would exceed `max_bytes` (existing bytes are free).
        Putting a model_id that is already stored replaces its record and bytes.
        `before_commit` runs just before the commit (module docstring); if it raises,
        nothing is stored and the exception propagates.
        """
        _check_record(record)
        if len(data) != record.size:
            raise ValueError(f"record.size is {record.size} but the data has {len(data)} bytes")
        if len(data) > MAX_BLOB_BYTES:
            raise ValueError(f"a model is at most {MAX_BLOB_BYTES} bytes")
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise ValueError("record.sha256 is not the SHA-256 of the data")
        with self.writing():
            self._check_usable()
            self._put_locked(record, data, before_commit)

    def stage_blob(
        self, sha256: str, data: bytes, *, cancel: threading.Event | None = None
    ) -> StagedBlob:
        """Seals `data` to a temporary file (fsynced), hashing each chunk as it is
        encrypted: the SHA-256 check costs no separate pass over the model. Takes no
        lock, so an upload seals while its model is validated in a worker (docs/
        performance.md); `put_staged` commits it, `discard` drops it. Raises ValueError
        (nothing left behind) if `sha256` is not the SHA-256 of `data`, and
        `StagingCancelledError` (nothing left behind) once `cancel` is set: a refused
        upload stops sealing within a chunk."""
        if _SHA256.fullmatch(sha256) is None:
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if len(data) > MAX_BLOB_BYTES:
            raise ValueError(f"a model is at most {MAX_BLOB_BYTES} bytes")
        self._check_usable()
        # locked until put_staged or discard: no replica's open removes it meanwhile
        tmp, fd = self._create_tmp(self._blobs_dir)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                digest = self._seal_blob(f, sha256, data, cancel)
                f.flush()
                os.fsync(f.fileno())
            if digest != sha256:
                raise ValueError("record.sha256 is not the SHA-256 of the data")
        except BaseException:
            self._drop_tmp(tmp)
            raise
        return StagedBlob(sha256=sha256, size=len(data), path=tmp)

    def put_staged(
        self,
        record: ModelRecord,
        staged: StagedBlob,
        *,
        before_commit: Callable[[], object] | None = None,
    ) -> None:
        """`put` for bytes `stage_blob` sealed: the blob file is renamed into place (when
        no stored model has these bytes yet), then record and manifest as in `put`.
        Durable when this returns; the staged file is used or left for `discard`."""
        _check_record(record)
        if (staged.sha256, staged.size) != (record.sha256, record.size):
            raise ValueError("the staged blob does not hold the bytes the record describes")
        with self.writing():
            self._check_usable()
            self._put_locked(record, None, before_commit, staged=staged)

    def discard(self, staged: StagedBlob) -> None:
        """Removes a staged blob `put_staged` did not use (or that was never committed)."""
        self._drop_tmp(staged.path)

    def update_record(
        self, record: ModelRecord, *, before_commit: Callable[[], object] | None = None
    ) -> None:
        """Replace the record of a stored model (e.g. its `shared_with`), keeping its bytes.

        Cheaper than `put` with the same bytes: nothing is decrypted, hashed or rewritten
        but the record and the manifest. The new record must describe the same bytes.
        """
        _check_record(record)
        with self.writing():
            self._check_usable()
            old = self._entries.get(record.model_id)
            if old is None:
                raise UnknownModelError(f"no model is known as {record.model_id[:140]!r}")
            if (record.sha256, record.size) != (old.record.sha256, old.record.size):
                raise ValueError("update_record cannot change a model's bytes; use put")
            self._put_locked(record, None, before_commit)

    def _put_locked(
        self,
        record: ModelRecord,
        data: bytes | None,
        before_commit: Callable[[], object] | None,
        *,
        staged: StagedBlob | None = None,
    ) -> None:
        """Write blob (if new; renamed into place if `staged`), record version, then the
        manifest: the commit point."""
        sha = record.sha256
        old = self._entries.get(record.model_id)
        refs = dict(self._refs)
        sizes = dict(self._blob_sizes)
        if old is None or old.record.sha256 != sha:
            if old is not None:
                _release(refs, sizes, old.record.sha256)
            refs[sha] = refs.get(sha, 0) + 1
        new_blob = sha not in sizes
        if new_blob:
            # update_record keeps the bytes, which exist
            size = staged.size if staged is not None else len(data or b"")
            assert data is not None or staged is not None
            used = sum(sizes.values())
            if used + size > self._max_bytes:
                raise StorageFullError(
                    f"storing {size} bytes would exceed the store's limit: "
                    f"{used} of {self._max_bytes} bytes are used, "
                    f"{self._max_bytes - used} are free; delete a model first"
                )
            sizes[sha] = size
        counter, now = self._counter + 1, self._clock()
        blob_path = self._blob_path(sha)
        record_path = self._record_path(record.model_id, counter)
        entries = dict(self._entries)
        entries[record.model_id] = _Entry(record, counter)
        try:
            if new_blob and staged is not None:
                self._place_staged(staged, blob_path)
            elif new_blob:
                assert data is not None
                self._write_atomic(blob_path, lambda f: self._seal_blob(f, sha, data))
            sealed_record = self._seal_record(record, counter)
            self._write_atomic(record_path, lambda f: f.write(sealed_record))
            manifest = self._seal_manifest(entries, counter, now)
            # a put never takes the room a delete may need on a full disk
            self._ensure_reserve(_reserve_for(len(manifest)))
            self._write_manifest(manifest, before_commit)
        except BaseException:
            if self._broken is None:
                # Nothing references these files: remove them now rather than at open.
                with contextlib.suppress(OSError):
                    record_path.unlink(missing_ok=True)
                if new_blob:
                    with contextlib.suppress(OSError):
                        blob_path.unlink(missing_ok=True)
            raise
        self._commit(entries, refs, sizes, counter, now)
        if old is not None:
            self._remove_after_commit(record.model_id, old, sizes)
        _log.info("sealed model %s stored (%d bytes)", record.model_id, record.size)

    def _commit(
        self,
        entries: dict[str, _Entry],
        refs: dict[str, int],
        sizes: dict[str, int],
        counter: int,
        committed_at: float,
    ) -> None:
        """Publish the state the manifest just made durable (call with the lock held)."""
        self._entries = entries
        self._refs = refs
        self._blob_sizes = sizes
        self._counter = counter
        self._committed_at = committed_at

    def _remove_after_commit(self, model_id: str, old: _Entry, sizes: dict[str, int]) -> None:
        """Unlink a superseded record version and its blob if no model uses it any more.

        Best effort: the manifest is already committed, so a failure here only leaves files
        that the next open removes as leftovers.
        """
        try:
            self._record_path(model_id, old.counter).unlink(missing_ok=True)
            _fsync_dir(self._records_dir)
            if old.record.sha256 not in sizes:
                self._blob_path(old.record.sha256).unlink(missing_ok=True)
                _fsync_dir(self._blobs_dir)
        except OSError as exc:
            _log.warning("removing superseded files of model %s failed: %s", model_id, exc)

    def get(self, model_id: str) -> bytearray:
        """The model's bytes, authenticated and checked against the record's SHA-256.

        A `bytearray`, not `bytes`: the plaintext is written once, straight into the
        buffer returned (`_read_blob`); a `bytes` would cost one more copy of the model
        into fresh memory, ~50 ms for 64 MiB (docs/performance.md, "Reloading a model from
        sealed storage"). Nobody else holds it: the caller owns it.
        """
        self._follow()
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None:
                raise UnknownModelError(f"no model is known as {model_id[:140]!r}")
            try:
                f = open(self._blob_path(entry.record.sha256), "rb")  # noqa: SIM115
            except FileNotFoundError:
                self._follow()  # deleted by another replica since the stat?
                if model_id not in self._entries:
                    raise UnknownModelError(f"no model is known as {model_id[:140]!r}") from None
                raise SealedDataError(f"the blob of model {model_id} is missing") from None
        with f:
            data, digest = self._read_blob(f, entry.record.sha256, entry.record.size)
        if digest != entry.record.sha256:
            # Unreachable unless the key leaked: the tag binds the sha256. Checked anyway.
            raise SealedDataError(f"the blob of model {model_id} does not match its SHA-256")
        return data

    def record(self, model_id: str) -> ModelRecord:
        self._follow()
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None:
                raise UnknownModelError(f"no model is known as {model_id[:140]!r}")
            return entry.record

    def records(self) -> list[ModelRecord]:
        """Every live record, oldest first."""
        return sorted(self.snapshot()[1], key=lambda r: (r.created_at, r.model_id))

    def snapshot(self) -> tuple[int, list[ModelRecord]]:
        """(counter, every live record) of one view, after following other replicas."""
        self._follow()
        with self._lock:
            return self._counter, [e.record for e in self._entries.values()]

    def poll(self) -> int:
        """The counter of the view after following other replicas' commits: one stat of
        the manifest when nothing changed. The registry compares it with the counter it
        last took in (`ModelRegistry.sync_from_store`)."""
        self._follow()
        return self._counter

    # -- replicas: the writer lock and the refresh (module docstring) -------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Holds the store's writer lock, this process's threads' and, through ``flock``
        on store.lock, every replica's, with the view refreshed from disk: what a caller
        checks inside (a name is free, a quota has room) still holds when a `put` or
        `delete` inside commits. Re-entrant: the mutations inside run under it."""
        with self._locked(exclusive=True) as taken:
            if taken:
                self._refresh_locked()
            yield

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[bool]:
        """The thread lock, then ``flock`` of store.lock (shared or exclusive); yields
        whether this call took the flock (False: this thread held it already)."""
        with self._lock:
            if self._flock_mode is not None:
                if exclusive and self._flock_mode != fcntl.LOCK_EX:
                    raise RuntimeError("the store's shared lock cannot become exclusive")
                yield False
                return
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            fcntl.flock(self._lock_fd, mode)
            self._flock_mode = mode
            try:
                yield True
            finally:
                self._flock_mode = None
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _follow(self) -> None:
        """Takes in other replicas' commits before a lookup: a stat of the manifest, and
        a refresh under the shared lock only when the file changed."""
        if _identity(self._manifest_file) != self._manifest_seen:
            with self._locked(exclusive=False):
                if _identity(self._manifest_file) != self._manifest_seen:  # not done meanwhile
                    self._refresh_locked()

    def _refresh_locked(self) -> None:
        """Re-reads the manifest (under the flock) and takes in what another replica
        committed; raises SealedDataError for a rollback or a second writer (module
        docstring). Under the exclusive lock the manifest is always read, not only when
        its stat changed: a network filesystem may cache attributes, not an open."""
        path = self._dir / MANIFEST_NAME
        seen = _identity(path)
        counter, committed_at, listed, digest = self._read_manifest()
        if digest == self._manifest_digest:
            self._manifest_seen = seen
            return
        if counter < self._counter:
            raise SealedDataError(
                f"the manifest went back from counter {self._counter}, which this process "
                f"read or wrote, to {counter}: the store was rolled back"
            )
        if counter == self._counter:
            raise SealedDataError(
                f"a second manifest was committed at counter {counter}: two writers "
                "changed the store at once; its storage does not honour flock "
                "(docs/operations.md, Replicas sharing one store)"
            )
        entries, sizes, refs = self._authenticate(counter, listed, known=self._entries)
        self._commit(entries, refs, sizes, counter, committed_at)
        self._manifest_seen, self._manifest_digest = seen, digest
        self._manifest_size = path.stat().st_size if path.exists() else 0
        reserve = self._dir / RESERVE_NAME
        self._reserve_size = reserve.stat().st_size if reserve.exists() else 0
        _log.info("sealed store refreshed: %d models, counter %d", len(entries), counter)

    def _create_tmp(self, directory: Path) -> tuple[Path, int]:
        """A new temp file, open read-write and ``flock``ed (LOCK_EX) until `_release_tmp`
        or `_drop_tmp`: no replica's open removes it meanwhile. Rechecked once locked, in
        case a replica's clean-up removed it between its creation and the lock."""
        for _ in range(5):
            tmp = _tmp_path(directory)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(fd, tmp):
                    with self._tmps_lock:
                        self._own_tmps[tmp] = fd
                    return tmp, fd
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.close(fd)
        raise OSError(errno.EAGAIN, f"temp files in {directory} keep disappearing")

    def _release_tmp(self, tmp: Path) -> None:
        """Closes (and so unlocks) a temp file once renamed into place."""
        with self._tmps_lock:
            fd = self._own_tmps.pop(tmp, None)
        if fd is not None:
            os.close(fd)

    def _drop_tmp(self, tmp: Path) -> None:
        """Removes a temp file, then unlocks it."""
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        self._release_tmp(tmp)

    def _holds_tmp(self, tmp: Path) -> bool:
        with self._tmps_lock:
            return tmp in self._own_tmps

    def delete(self, model_id: str, *, before_commit: Callable[[], object] | None = None) -> None:
        """Remove the model: manifest first (the commit), then its record and unused blob.

        Works on a full disk (module docstring: the reserve). `before_commit` runs just
        before the commit; if it raises, nothing is deleted and the exception propagates.

        Files are unlinked, not overwritten: they hold only ciphertext under keys the host
        never sees, and on journaling, copy-on-write or flash storage an overwrite would not
        reach the old blocks anyway (nor a copy the host may already have taken). Deletion
        is not cryptographic erasure: the same enclave identity could still decrypt a
        retained copy, which the rollback checks above refuse to reinstate where they can.
        """
        with self.writing():
            self._check_usable()
            entry = self._entries.get(model_id)
            if entry is None:
                raise UnknownModelError(f"no model is known as {model_id[:140]!r}")
            counter, now = self._counter + 1, self._clock()
            entries = dict(self._entries)
            del entries[model_id]
            refs = dict(self._refs)
            sizes = dict(self._blob_sizes)
            _release(refs, sizes, entry.record.sha256)
            manifest = self._seal_manifest(entries, counter, now)
            done = False

            def once() -> None:  # a retry must not write the audit entry twice
                nonlocal done
                if before_commit is not None and not done:
                    before_commit()
                done = True

            try:
                self._write_manifest(manifest, once)
            except Exception as exc:
                if self._broken is not None or not is_disk_full(exc) or not self._drop_reserve():
                    raise
                _log.warning("the store's disk is full: the space reserve lets a delete commit")
                self._write_manifest(manifest, once)
            self._commit(entries, refs, sizes, counter, now)
            self._remove_after_commit(model_id, entry, sizes)
            try:
                self._ensure_reserve(_reserve_for(len(manifest)))
            except OSError as exc:
                _log.warning("the space reserve could not be restored yet: %s", exc.strerror)
            _log.info("sealed model %s deleted", model_id)

    # -- sealing ------------------------------------------------------------------------

    def _blob_path(self, sha256: str) -> Path:
        tag = hmac.new(self._name_key, sha256.encode("ascii"), hashlib.sha256).hexdigest()
        return self._blobs_dir / f"{tag}{SUFFIX}"

    def _record_path(self, model_id: str, counter: int) -> Path:
        return self._records_dir / f"{model_id}.{counter}{SUFFIX}"

    def _seal_blob(
        self, f: BinaryIO, sha256: str, data: bytes, cancel: threading.Event | None = None
    ) -> str:
        """Stream-encrypt `data` into `f` (no second full copy in memory); returns the
        SHA-256 of `data`, computed chunk by chunk while each is still in cache."""
        nonce = os.urandom(NONCE_SIZE)
        enc = Cipher(algorithms.AES(self._blob_key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(_AAD_BLOB + bytes.fromhex(sha256))
        digest = hashlib.sha256()
        f.write(bytes([FORMAT_VERSION]) + nonce)
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            if cancel is not None and cancel.is_set():
                raise StagingCancelledError("sealing was cancelled: the upload was refused")
            chunk = view[start : start + _CHUNK]
            digest.update(chunk)
            f.write(enc.update(chunk))
        f.write(enc.finalize())
        f.write(enc.tag)
        return digest.hexdigest()

    def _place_staged(self, staged: StagedBlob, blob_path: Path) -> None:
        """Renames a staged (sealed, fsynced) blob into place and makes that durable, with
        `_write_atomic`'s guarantees: a failure before the rename changes nothing."""
        os.replace(staged.path, blob_path)
        self._release_tmp(staged.path)
        try:
            _fsync_dir(blob_path.parent)
        except BaseException as exc:
            self._broken = f"fsync of {blob_path.parent} failed: {exc}"
            raise

    def _blob_header(self, f: io.BufferedReader, sha256: str, size: int) -> bytes:
        """Check the blob file's length and version; return its nonce."""
        total = os.fstat(f.fileno()).st_size
        if total != size + OVERHEAD:
            raise SealedDataError(
                f"blob {sha256} has {total} bytes, expected {size + OVERHEAD}: altered"
            )
        header = f.read(HEADER_SIZE)
        if len(header) != HEADER_SIZE or header[0] != FORMAT_VERSION:
            raise SealedDataError(f"blob {sha256} has an unknown format version")
        return header[1:]

    def _read_blob(self, f: io.BufferedReader, sha256: str, size: int) -> tuple[bytearray, str]:
        """Decrypt and authenticate the whole blob; returns it with the SHA-256 of its
        plaintext.

        Streamed, because each copy of a model into fresh memory costs page faults that
        dominate on a VM (~50 ms per 64 MiB, more than AES-GCM itself): the ciphertext
        goes through one reused `_CHUNK` buffer and the plaintext is written once, into
        the buffer returned. Each plaintext chunk is hashed on `_HASHER` while the next
        one is decrypted (hashlib releases the GIL), so the SHA-256 check costs little
        wall time when a core is free. Nothing leaves this method before the tag is
        verified (`finalize`): unauthenticated plaintext is never returned.
        """
        nonce = self._blob_header(f, sha256, size)
        dec = Cipher(algorithms.AES(self._blob_key), modes.GCM(nonce)).decryptor()
        dec.authenticate_additional_data(_AAD_BLOB + bytes.fromhex(sha256))
        out = bytearray(size)
        plain = memoryview(out)
        chunk = memoryview(bytearray(_CHUNK))
        digest = hashlib.sha256()
        hashing: Future[None] | None = None
        try:
            pos = 0
            while pos < size:
                n = f.readinto(chunk[: min(_CHUNK, size - pos)])
                if not n:
                    raise SealedDataError(f"blob {sha256} is truncated")
                dec.update_into(chunk[:n], plain[pos : pos + n])
                if hashing is not None:
                    hashing.result()  # in order, one chunk behind
                hashing = _hash_behind(digest, plain[pos : pos + n])
                pos += n
            tag = f.read(TAG_SIZE + 1)
            if len(tag) != TAG_SIZE:
                raise SealedDataError(f"blob {sha256} is truncated")
            try:
                dec.finalize_with_tag(tag)
            except InvalidTag:
                raise SealedDataError(_blob_auth_failure(sha256)) from None
        finally:
            if hashing is not None:
                hashing.result()
            plain.release()
        return out, digest.hexdigest()

    def _verify_blob(self, f: io.BufferedReader, sha256: str, size: int) -> None:
        """Authenticate the blob streaming, in O(1 MiB) memory, keeping no plaintext."""
        nonce = self._blob_header(f, sha256, size)
        f.seek(-TAG_SIZE, os.SEEK_END)
        tag = f.read(TAG_SIZE)
        f.seek(HEADER_SIZE)
        dec = Cipher(algorithms.AES(self._blob_key), modes.GCM(nonce, tag)).decryptor()
        dec.authenticate_additional_data(_AAD_BLOB + bytes.fromhex(sha256))
        chunk = bytearray(_CHUNK)
        scratch = bytearray(_CHUNK + 15)
        pos = 0
        while pos < size:
            n = f.readinto(memoryview(chunk)[: min(_CHUNK, size - pos)])
            if not n:
                raise SealedDataError(f"blob {sha256} is truncated")
            dec.update_into(memoryview(chunk)[:n], scratch)
            pos += n
        try:
            dec.finalize()
        except InvalidTag:
            raise SealedDataError(_blob_auth_failure(sha256)) from None

    def _seal_record(self, record: ModelRecord, counter: int) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        aad = _record_aad(record.model_id, counter)
        ct = self._record_aead.encrypt(nonce, _record_to_json(record, counter), aad)
        return bytes([FORMAT_VERSION]) + nonce + ct

    def _unseal_record(self, model_id: str, counter: int) -> ModelRecord:
        """The record version written at `counter`; its file name says which one to read,
        the associated data makes sure that is what the file holds."""
        what = f"record {model_id} (version {counter})"
        path = self._record_path(model_id, counter)
        data = _read_bounded(path, MAX_RECORD_FILE, what)
        plain = _open_sealed(self._record_aead, data, _record_aad(model_id, counter), what)
        record, written_at = _record_from_json(plain)
        if record.model_id != model_id or written_at != counter:
            raise SealedDataError(f"{what} disagrees with its own file name")
        return record

    def _seal_manifest(
        self, entries: dict[str, _Entry], counter: int, committed_at: float
    ) -> bytes:
        body = {
            "format": FORMAT_VERSION,
            "counter": counter,
            "previous": counter - 1,
            "committed_at": committed_at,
            "models": [
                {
                    "model_id": e.record.model_id,
                    "sha256": e.record.sha256,
                    "owner": e.record.owner,
                    "name": e.record.name,
                    "counter": e.counter,
                }
                for e in entries.values()
            ],
        }
        nonce = os.urandom(NONCE_SIZE)
        plain = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return (
            bytes([FORMAT_VERSION])
            + nonce
            + self._manifest_aead.encrypt(nonce, plain, _AAD_MANIFEST)
        )

    # -- durable writes -----------------------------------------------------------------

    def _write_atomic(
        self,
        path: Path,
        write: Callable[[BinaryIO], object],
        before_replace: Callable[[], object] | None = None,
    ) -> None:
        """Write via temp file + fsync + rename + directory fsync.

        A failure before the rename (`before_replace` raising included) changes nothing on
        disk (`os.replace` is atomic: it either happened or raised). A failure after it
        leaves the store broken (see `StoreBrokenError`): the rename may or may not survive
        a power cut.
        """
        tmp, fd = self._create_tmp(path.parent)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if before_replace is not None:
                before_replace()
            os.replace(tmp, path)
        except BaseException:
            self._drop_tmp(tmp)
            raise
        self._release_tmp(tmp)
        try:
            _fsync_dir(path.parent)
        except BaseException as exc:
            self._broken = f"fsync of {path.parent} failed: {exc}"
            raise

    def _write_manifest(
        self, sealed: bytes, before_commit: Callable[[], object] | None = None
    ) -> None:
        """Replace the manifest: the commit point of every mutation."""
        path = self._dir / MANIFEST_NAME
        self._write_atomic(path, lambda f: f.write(sealed), before_commit)
        self._manifest_size = len(sealed)
        self._manifest_digest = hashlib.sha256(sealed).digest()
        self._manifest_seen = _identity(path)

    # -- the space reserve (module docstring: deleting on a full disk) ------------------

    def _ensure_reserve(self, size: int) -> None:
        """Grows space.reserve to `size` allocated bytes; raises OSError (the file is
        left as it was) when the disk has no room for that."""
        if self._reserve_size >= size:
            return
        path = self._dir / RESERVE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            before = os.fstat(fd).st_size
            try:
                _allocate(fd, before, size)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, before)
                raise
        finally:
            os.close(fd)
        self._reserve_size = size

    def _drop_reserve(self) -> bool:
        """Unlinks space.reserve to free its room; False if there was none to free."""
        path = self._dir / RESERVE_NAME
        freed = self._reserve_size > 0 or path.exists()
        path.unlink(missing_ok=True)
        self._reserve_size = 0
        return freed

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StoreBrokenError(f"the sealed store must be reopened: {self._broken}")

    # -- open and recovery --------------------------------------------------------------

    def _open(self, expected_min_counter: int) -> None:
        for d in (self._dir, self._blobs_dir, self._records_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self._dir, self._blobs_dir, self._records_dir):
            _remove_stale_tmps(d, self._holds_tmp)

        seen = _identity(self._dir / MANIFEST_NAME)
        counter, committed_at, listed, digest = self._read_manifest()
        if counter < expected_min_counter:
            raise SealedDataError(
                f"the manifest has counter {counter} but the trusted counter requires at "
                f"least {expected_min_counter}: the store was rolled back"
            )

        entries, sizes, refs = self._authenticate(counter, listed, known={})
        self._remove_leftovers(entries, counter)
        manifest_path = self._dir / MANIFEST_NAME
        self._manifest_size = manifest_path.stat().st_size if manifest_path.exists() else 0
        reserve_path = self._dir / RESERVE_NAME
        self._reserve_size = reserve_path.stat().st_size if reserve_path.exists() else 0
        try:
            self._ensure_reserve(_reserve_for(self._manifest_size))
        except OSError as exc:  # a full disk must not stop the store from opening
            _log.warning("the space reserve could not be allocated: %s", exc.strerror)
        self._entries = entries
        self._blob_sizes = sizes
        self._refs = refs
        self._counter = counter
        self._committed_at = committed_at
        self._manifest_seen, self._manifest_digest = seen, digest
        _log.info("sealed store opened: %d models, counter %d", len(entries), counter)

    def _authenticate(
        self, counter: int, listed: list[_Listed], *, known: dict[str, _Entry]
    ) -> tuple[dict[str, _Entry], dict[str, int], dict[str, int]]:
        """(entries, blob sizes, blob references) of a manifest's listing, each record
        authenticated and agreeing with it, each blob there with its size (open's
        `verify_blobs` authenticates them afterwards). Records in `known` at the same
        version, and their blobs, were checked when this process read them: a refresh
        skips them."""
        entries: dict[str, _Entry] = {}
        for item in listed:
            model_id = item.model_id
            if item.counter > counter:
                raise SealedDataError(
                    f"the manifest (counter {counter}) lists model {model_id} as written at "
                    f"counter {item.counter}: not written by this store"
                )
            old = known.get(model_id)
            if old is not None and old.counter == item.counter:
                record = old.record
            else:
                record = self._unseal_record(model_id, item.counter)
            if (record.sha256, record.owner, record.name) != (item.sha256, item.owner, item.name):
                raise SealedDataError(f"record {model_id} disagrees with the manifest")
            entries[model_id] = _Entry(record, item.counter)
        checked = {e.record.sha256: e.record.size for e in known.values()}

        sizes: dict[str, int] = {}
        refs: dict[str, int] = {}
        for entry in entries.values():
            r = entry.record
            if sizes.setdefault(r.sha256, r.size) != r.size:
                raise SealedDataError(f"records disagree on the size of blob {r.sha256}")
            refs[r.sha256] = refs.get(r.sha256, 0) + 1
        self._check_blobs(entries, sizes, verify=False, checked=checked)
        return entries, sizes, refs

    def _check_blobs(
        self,
        entries: dict[str, _Entry],
        sizes: dict[str, int],
        *,
        verify: bool,
        checked: dict[str, int],
    ) -> None:
        """Each blob of `sizes` exists with its size, and with `verify` authenticates in
        full; those `checked` (at that size) are skipped."""
        for sha, size in sizes.items():
            if checked.get(sha) == size:
                continue
            users = ", ".join(sorted(m for m, e in entries.items() if e.record.sha256 == sha))
            path = self._blob_path(sha)
            try:
                with open(path, "rb") as f:
                    if verify:
                        self._verify_blob(f, sha, size)
                    elif os.fstat(f.fileno()).st_size != size + OVERHEAD:
                        raise SealedDataError(f"blob {sha} has the wrong size: altered")
            except FileNotFoundError:
                raise SealedDataError(
                    f"the blob of model(s) {users} is missing ({path.name})"
                ) from None
            except SealedDataError as exc:
                raise SealedDataError(f"model(s) {users}: {exc}") from None

    def _read_manifest(self) -> tuple[int, float, list[_Listed], bytes]:
        """(counter, committed_at, entries, SHA-256 of the file); (0, 0.0, [], b"") for a
        store never written to."""
        path = self._dir / MANIFEST_NAME
        try:
            data = _read_bounded(path, MAX_MANIFEST_FILE, "the manifest")
        except SealedDataError:
            if path.exists():
                raise
            return 0, 0.0, [], b""
        plain = _open_sealed(self._manifest_aead, data, _AAD_MANIFEST, "the manifest")
        try:
            body = json.loads(plain)
            counter = _int(body["counter"])
            committed_at = float(body["committed_at"])
            if body["format"] != FORMAT_VERSION or body["previous"] != counter - 1 or counter < 1:
                raise ValueError("unexpected format, counter or previous counter")
            listed: list[_Listed] = []
            seen: set[str] = set()
            for item in body["models"]:
                entry = _Listed(
                    model_id=_str(item["model_id"]),
                    sha256=_str(item["sha256"]),
                    owner=_str(item["owner"]),
                    name=_str(item["name"]),
                    counter=_int(item["counter"]),
                )
                if _MODEL_ID.fullmatch(entry.model_id) is None or entry.model_id in seen:
                    raise ValueError("bad or repeated model_id")
                if _SHA256.fullmatch(entry.sha256) is None:
                    raise ValueError("bad sha256")
                seen.add(entry.model_id)
                listed.append(entry)
        except (ValueError, KeyError, TypeError) as exc:
            raise SealedDataError(f"the manifest is malformed: {exc}") from None
        return counter, committed_at, listed, hashlib.sha256(data).digest()

    def _remove_leftovers(self, entries: dict[str, _Entry], counter: int) -> None:
        """Remove files no manifest entry names, after checking none proves a rollback."""
        live_blobs = {self._blob_path(e.record.sha256).name for e in entries.values()}
        live_records = {self._record_path(m, e.counter).name for m, e in entries.items()}
        stale_records: list[Path] = []
        for path in self._records_dir.iterdir():
            match = _RECORD_FILE.fullmatch(path.name)
            if match is None or path.name in live_records:
                continue  # not ours (left alone), or live
            model_id, written_at = match.group(1), int(match.group(2))
            try:
                self._unseal_record(model_id, written_at)
            except SealedDataError:
                _log.warning("removing unreferenced record file %s: not authentic", path.name)
            else:
                if written_at > counter + 1:
                    raise SealedDataError(
                        f"record {model_id} was written at counter {written_at} but the "
                        f"manifest is at {counter}: the manifest was rolled back"
                    )
            stale_records.append(path)
        stale_blobs = [
            p
            for p in self._blobs_dir.iterdir()
            if _BLOB_FILE.fullmatch(p.name) is not None and p.name not in live_blobs
        ]
        for path in stale_records + stale_blobs:
            _log.info(
                "removing %s/%s: left over by an interrupted write", path.parent.name, path.name
            )
            path.unlink(missing_ok=True)
        if stale_records:
            _fsync_dir(self._records_dir)
        if stale_blobs:
            _fsync_dir(self._blobs_dir)


def _reserve_for(manifest_size: int) -> int:
    """The reserve a store with a manifest of this size keeps (a 64 KiB multiple)."""
    wanted = max(RESERVE_MIN, 2 * manifest_size)
    return -(-wanted // (64 * 1024)) * (64 * 1024)


def _allocate(fd: int, start: int, size: int) -> None:
    """Allocates bytes [start, size) of the file: `posix_fallocate` where the filesystem
    supports it, else zeros written (which a compressing filesystem may not store)."""
    try:
        os.posix_fallocate(fd, start, size - start)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    zeros = bytes(64 * 1024)
    os.lseek(fd, start, os.SEEK_SET)
    while start < size:
        start += os.write(fd, zeros[: min(len(zeros), size - start)])


def _hash_behind(digest: hashlib._Hash, chunk: memoryview) -> Future[None] | None:
    """Hashes `chunk` on `_HASHER` (the caller waited for the previous chunk's hash); at
    interpreter shutdown, when the executor takes no more work, right here instead."""
    try:
        return _HASHER.submit(digest.update, chunk)
    except RuntimeError:
        digest.update(chunk)
        return None


def _blob_auth_failure(sha256: str) -> str:
    return f"blob {sha256} fails authentication: altered, swapped or sealed under another key"


def _record_aad(model_id: str, counter: int) -> bytes:
    return _AAD_RECORD + model_id.encode("ascii") + b"\0" + counter.to_bytes(8, "big")


def _open_sealed(aead: AESGCM, data: bytes, aad: bytes, what: str) -> bytes:
    if len(data) < OVERHEAD:
        raise SealedDataError(f"{what} is truncated ({len(data)} bytes)")
    if data[0] != FORMAT_VERSION:
        raise SealedDataError(f"{what} has unknown format version {data[0]}")
    try:
        return aead.decrypt(data[1:HEADER_SIZE], data[HEADER_SIZE:], aad)
    except InvalidTag:
        raise SealedDataError(
            f"{what} fails authentication: altered, swapped or sealed under another key"
        ) from None


def _release(refs: dict[str, int], sizes: dict[str, int], sha256: str) -> None:
    """Drop one reference to a blob; forget its size when it was the last."""
    refs[sha256] -= 1
    if refs[sha256] == 0:
        del refs[sha256]
        del sizes[sha256]


def _check_record(record: ModelRecord) -> None:
    """Refuse records that could escape the directory or not round-trip through JSON."""
    if _MODEL_ID.fullmatch(record.model_id) is None:
        raise ValueError("model_id must be 1-128 letters, digits, '_' or '-'")
    if _SHA256.fullmatch(record.sha256) is None:
        raise ValueError("sha256 must be 64 lowercase hex digits")
    if not all(isinstance(s, str) for s in (record.name, record.owner, *record.shared_with)):
        raise ValueError("name, owner and shared_with must be strings")
    if not isinstance(record.size, int) or record.size < 0:
        raise ValueError("size must be a non-negative integer")


def iter_sealed_files(directory: Path) -> Iterator[Path]:
    """Every sealed file of a store directory (for tests and tooling)."""
    root = Path(directory)
    if (root / MANIFEST_NAME).exists():
        yield root / MANIFEST_NAME
    for sub in (RECORDS_DIR, BLOBS_DIR):
        if (root / sub).is_dir():
            yield from sorted((root / sub).glob(f"*{SUFFIX}"))
