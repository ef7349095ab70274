"""Append-only, hash-chained audit log of management events.

Why: the operator of the machine is not trusted, yet tenants and auditors need to know
what happened to models (uploaded, replaced, shared, deleted, evicted) and when the server
refused someone. This log records those *management* events, never user data: no tensor
content, no model bytes, no model names (names are tenant-chosen text), only server-made
identifiers (model_id, SHA-256), a tenant identifier and a few short, bounded details.

Format: one canonical JSON object per line (sorted keys, no whitespace, ASCII only)::

    {"detail":{...},"event":"upload","hash":"<64 hex>","model_id":"m-...","prev":"<64 hex>",
     "seq":1,"sha256":"<64 hex>|null","tenant":"...|null","time":1700000000.25}

``hash`` is the SHA-256 of the canonical JSON of the entry without ``hash``; ``prev`` is
the previous entry's ``hash`` (64 zeros for the first entry); ``seq`` counts from 1 with no
gaps. Each line must be byte-for-byte the canonical form, so the file is exactly what was
written: no second spelling of the same entry exists.

What the chain proves, and what it does not:

- Given a trusted head hash (the hash of some entry, obtained out of band), every entry up
  to it is exactly what was written: an edit, a deletion, an insertion or a reordering
  before it breaks a ``hash`` or a ``prev`` link, and `verify_audit_log` names the line.
- Without such an anchor it detects accidental corruption and naive edits only: there is no
  key, so whoever can rewrite the file can recompute every hash of a forged chain.
- It does not detect truncation of the tail unless the last hash is anchored elsewhere:
  the head is logged at shutdown (`AuditLog.close`) and can be put in signed receipts;
  ``verify_audit_log(path, anchor=...)`` then checks that the anchored entry is still there.

Crash safety: each entry is one ``write`` on an ``O_APPEND`` descriptor followed by
``fsync``, so earlier entries survive a crash. A crash during a write can leave a torn last
line (bytes without a final newline). On the next open the log does not refuse to start and
does not hide it: it terminates the torn bytes with a newline and appends a ``chain_repair``
entry whose ``prev`` is the last valid hash and whose detail commits to the damaged bytes
(their length and SHA-256), so the break is itself part of the chain and verification stays
intact from then on (the repair is reported, not counted as a problem). A complete last line
that is not a valid entry cannot come from a crash of this writer, so opening such a log
refuses with `AuditLogError`: someone must look at it (``blindinfer audit verify``) and move
it aside. Opening checks only the tail (start-up stays O(1)); the whole chain is checked by
`verify_audit_log`.

A write that fails while the server runs (a full disk) raises `AuditLogError` (the caller
refuses its operation) and may leave part of the entry in the file; the next append first
truncates the file back to its last durable entry (those bytes are this process's own,
never acknowledged), so the log recovers by itself once the disk has room.

One process owns a log file (an exclusive ``flock`` enforces it; a second one gets
`AuditLogInUseError`); within it `AuditLog` is thread-safe. Replicas sharing one store
directory each append their own chain, ``audit-<replica id>.log`` (`audit_file_name`);
a server alone on its store keeps ``audit.log``.
"""

from __future__ import annotations

import collections
import enum
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from blindinfer.errors import BlindInferError

log = logging.getLogger("blindinfer.server.audit")

GENESIS: Final = "0" * 64
"""``prev`` of the first entry."""

MAX_DETAIL_KEYS: Final = 8
MAX_KEY_CHARS: Final = 32
MAX_VALUE_CHARS: Final = 256
MAX_TENANT_CHARS: Final = 64
MAX_LINE_BYTES: Final = 8192
"""No valid entry is longer (the fields above bound it to about 5 KB even with every
character JSON-escaped), so a longer line is damage and is never read whole."""

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1
_TAIL_SCAN_BYTES: Final = 1 << 20
_MEMORY_ENTRIES: Final = 4096
_KEY = re.compile(r"[a-z][a-z0-9_]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")  # the store's model_id syntax (store/names.py)
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@\-]*")
_FIELDS: Final = frozenset(
    {"seq", "time", "event", "tenant", "model_id", "sha256", "detail", "prev", "hash"}
)


class AuditEvent(enum.StrEnum):
    """The kinds of management event; `CHAIN_REPAIR` is written by the log itself only."""

    UPLOAD = "upload"
    REPLACE = "replace"
    DELETE = "delete"
    SHARE = "share"
    EVICT = "evict"
    RESTORE = "restore"
    AUTH_FAILURE = "auth_failure"
    QUOTA_REFUSAL = "quota_refusal"
    SERVER_START = "server_start"
    SERVER_STOP = "server_stop"
    CHAIN_REPAIR = "chain_repair"


_EVENTS: Final = frozenset(e.value for e in AuditEvent)


class AuditLogError(BlindInferError):
    """The audit log cannot be opened or written; the event it was given is not recorded."""


class AuditLogInUseError(AuditLogError):
    """Another process holds the log file: one chain has one writer."""


AUDIT_FILE: Final = "audit.log"
"""The audit log of a server alone on its store directory."""

_REPLICA_ID: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def check_replica_id(value: str) -> str:
    """`value` if it can name a replica's audit log file: 1-64 of A-Z a-z 0-9 . _ -,
    not starting with a dot; raises ValueError otherwise."""
    if _REPLICA_ID.fullmatch(value) is None:
        raise ValueError(
            f"replica id {value[:80]!r} is not 1-64 of A-Z a-z 0-9 . _ - (not starting "
            "with a dot), e.g. the pod's name"
        )
    return value


def audit_file_name(replica_id: str | None) -> str:
    """``audit.log`` without a replica id; ``audit-<id>.log`` for each replica sharing a
    store directory: one file, one writer, one chain each."""
    return AUDIT_FILE if replica_id is None else f"audit-{check_replica_id(replica_id)}.log"


class AuditFieldError(AuditLogError, ValueError):
    """A field a caller passed is not allowed in the log (type, length or syntax)."""


class AuditEntryMismatch(AuditLogError):
    """A well-formed entry whose bytes are not what its own hash covers: an edit.

    It carries the entry's claimed `seq` and `hash` so that verification can go on from
    it and name only the edited line, not every line after it as well.
    """

    def __init__(self, message: str, seq: int, claimed_hash: str) -> None:
        super().__init__(message)
        self.seq = seq
        self.claimed_hash = claimed_hash


@dataclass(frozen=True, slots=True, eq=True)
class AuditEntry:
    """One entry, as written; `line` is its exact canonical JSON (without the newline)."""

    seq: int
    time: float
    event: str
    tenant: str | None
    model_id: str | None
    sha256: str | None
    detail: Mapping[str, str | int]
    prev: str
    hash: str
    line: bytes = field(repr=False, compare=False)

    def body(self) -> dict[str, object]:
        """The entry without ``hash``: what ``hash`` is computed over."""
        return {
            "seq": self.seq,
            "time": self.time,
            "event": self.event,
            "tenant": self.tenant,
            "model_id": self.model_id,
            "sha256": self.sha256,
            "detail": dict(self.detail),
            "prev": self.prev,
        }


def canonical_json(value: object) -> bytes:
    """Sorted keys, no whitespace, ASCII: one byte string per value, so hashes are stable."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_hash(body: Mapping[str, object]) -> str:
    """SHA-256 (hex) of the canonical JSON of an entry without its ``hash`` field."""
    return hashlib.sha256(canonical_json(dict(body))).hexdigest()


# --- field validation: shared by record() and by the parser, so both accept the same set --


def _check_optional(name: str, value: object, pattern: re.Pattern[str], limit: int) -> None:
    if value is None:
        return
    if type(value) is not str or len(value) > limit or pattern.fullmatch(value) is None:
        raise AuditFieldError(f"{name} must be None or match {pattern.pattern} (<= {limit})")


def _check_detail(detail: object) -> dict[str, str | int]:
    """Only a few short keys with short printable strings or 64-bit ints.

    The bounds are what keep user data out: bytes, floats, lists, arrays (tensor data) are
    refused by type, long strings (an encoded tensor or a prompt) by length. Callers must
    still never put user data (inputs, outputs, model names, request contents) in here.
    """
    if not isinstance(detail, Mapping):
        raise AuditFieldError("detail must be a mapping")
    if len(detail) > MAX_DETAIL_KEYS:
        raise AuditFieldError(f"detail has more than {MAX_DETAIL_KEYS} keys")
    checked: dict[str, str | int] = {}
    for key, value in detail.items():
        if type(key) is not str or len(key) > MAX_KEY_CHARS or _KEY.fullmatch(key) is None:
            raise AuditFieldError(f"detail keys are [a-z][a-z0-9_]*, <= {MAX_KEY_CHARS} chars")
        if type(value) is int:  # not bool: a flag is spelled as a short string
            if not _INT_MIN <= value <= _INT_MAX:
                raise AuditFieldError(f"detail[{key!r}] is outside the signed 64-bit range")
        elif type(value) is str:
            if len(value) > MAX_VALUE_CHARS or not (value.isascii() and value.isprintable()):
                raise AuditFieldError(
                    f"detail[{key!r}] must be printable ASCII of <= {MAX_VALUE_CHARS} chars"
                )
        else:
            raise AuditFieldError(
                f"detail[{key!r}] is a {type(value).__name__}; only str and int are allowed"
            )
        checked[key] = value
    return checked


def _check_fields(
    tenant: object, model_id: object, sha256: object, detail: object
) -> dict[str, str | int]:
    _check_optional("tenant", tenant, _TENANT, MAX_TENANT_CHARS)
    _check_optional("model_id", model_id, _MODEL_ID, 34)
    _check_optional("sha256", sha256, _HEX64, 64)
    return _check_detail(detail)


def _finish(
    seq: int,
    when: float,
    event: str,
    tenant: str | None,
    model_id: str | None,
    sha256: str | None,
    detail: dict[str, str | int],
    prev: str,
) -> AuditEntry:
    """The entry with its hash and canonical line, from already validated fields."""
    body: dict[str, object] = {
        "seq": seq,
        "time": when,
        "event": event,
        "tenant": tenant,
        "model_id": model_id,
        "sha256": sha256,
        "detail": detail,
        "prev": prev,
    }
    digest = entry_hash(body)
    return AuditEntry(
        seq=seq,
        time=when,
        event=event,
        tenant=tenant,
        model_id=model_id,
        sha256=sha256,
        detail=types.MappingProxyType(detail),
        prev=prev,
        hash=digest,
        line=canonical_json({**body, "hash": digest}),
    )


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_entry(line: bytes) -> AuditEntry:
    """One line (without its newline) as an entry whose own hash checks out.

    Raises `AuditLogError` saying what is wrong; links to other entries are not checked here.
    """
    if len(line) > MAX_LINE_BYTES:
        raise AuditLogError(f"longer than {MAX_LINE_BYTES} bytes")
    try:
        value = json.loads(line.decode("ascii"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AuditLogError(f"not a JSON entry ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise AuditLogError("not a JSON object")
    if set(value) != _FIELDS:
        raise AuditLogError(f"fields are {sorted(value)}, expected {sorted(_FIELDS)}")
    seq, when, event = value["seq"], value["time"], value["event"]
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= _INT_MAX:
        raise AuditLogError("seq is not a positive 64-bit integer")
    if isinstance(when, bool) or not isinstance(when, int | float):
        raise AuditLogError("time is not a number")
    if not (0 <= when <= _INT_MAX if isinstance(when, int) else math.isfinite(when) and when >= 0):
        raise AuditLogError("time is not a non-negative finite number")
    if not isinstance(event, str) or event not in _EVENTS:
        raise AuditLogError(f"unknown event {str(event)[:40]!r}")
    prev, stored_hash = value["prev"], value["hash"]
    for name, hexdigest in (("prev", prev), ("hash", stored_hash)):
        if not isinstance(hexdigest, str) or _HEX64.fullmatch(hexdigest) is None:
            raise AuditLogError(f"{name} is not 64 lowercase hex digits")
    assert isinstance(prev, str)
    try:
        detail = _check_fields(value["tenant"], value["model_id"], value["sha256"], value["detail"])
    except AuditFieldError as exc:
        raise AuditLogError(str(exc)) from None
    entry = _finish(
        seq,
        when,
        event,
        _optional_str(value["tenant"]),
        _optional_str(value["model_id"]),
        _optional_str(value["sha256"]),
        detail,
        prev,
    )
    assert isinstance(stored_hash, str)
    if entry.hash != stored_hash:
        raise AuditEntryMismatch(
            "hash does not match the entry's contents (edited)", seq, stored_hash
        )
    if entry.line != line:
        raise AuditEntryMismatch("not in canonical form (rewritten)", seq, stored_hash)
    return entry


# --- the writer ------------------------------------------------------------------------


class AuditLog:
    """Appends entries to `path` (or keeps them in memory when `path` is None).

    `clock` returns Unix seconds; tests pass a fixed one. Memory mode keeps the last
    4096 entries in `entries`, persists nothing, and exists for tests and for servers run
    without an audit file.
    """

    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._failed: OSError | None = None
        self._size = 0  # bytes of the file that hold complete, durable entries
        self._closed = False
        self._seq = 0
        self._head = GENESIS
        self._memory: collections.deque[AuditEntry] | None = None
        self.repair: AuditEntry | None = None
        """The ``chain_repair`` entry written at open, if the tail was torn."""
        if path is None:
            self._memory = collections.deque(maxlen=_MEMORY_ENTRIES)
            return
        self._fd = self._open(path)
        try:
            self._recover()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def head(self) -> str:
        """Hash of the last entry (64 zeros if none): the value to anchor elsewhere."""
        return self._head

    @property
    def seq(self) -> int:
        """``seq`` of the last entry (0 if none)."""
        return self._seq

    @property
    def entries(self) -> tuple[AuditEntry, ...]:
        """Memory mode only: the most recent entries (a file-backed log keeps none)."""
        return tuple(self._memory) if self._memory is not None else ()

    def record(
        self,
        event: str,
        *,
        tenant: str | None = None,
        model_id: str | None = None,
        sha256: str | None = None,
        detail: Mapping[str, str | int] | None = None,
    ) -> AuditEntry:
        """Appends one durable entry (written and fsynced before this returns).

        Never pass user data: `tenant` is an identifier, `model_id` the store's id (not the
        model's name), `sha256` the model's hash, `detail` a few short str/int facts such
        as a reason code or a byte count. Raises `AuditFieldError` for anything else and
        `AuditLogError` when the entry could not be made durable; a caller that must not act
        unaudited (a management operation) should then refuse the operation.
        """
        if type(event) not in (str, AuditEvent) or event not in _EVENTS:
            raise AuditFieldError(f"unknown audit event {str(event)[:40]!r}")
        if event == AuditEvent.CHAIN_REPAIR:
            raise AuditFieldError("chain_repair entries are written by the log itself")
        checked = _check_fields(tenant, model_id, sha256, {} if detail is None else detail)
        with self._lock:
            return self._append(str(event), tenant, model_id, sha256, checked, b"")

    def close(self) -> str:
        """Closes the file and logs the head hash, so it can be anchored; returns it.

        Logged as a warning so that it reaches the operator's terminal without any logging
        configuration: the head is what makes truncation of the tail detectable later.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._fd is not None:
                    os.close(self._fd)  # also releases the flock
                    self._fd = None
                log.warning(
                    "audit log %s closed: %d entries, head %s (anchor it to detect truncation)",
                    self._path if self._path is not None else "(memory)",
                    self._seq,
                    self._head,
                )
            return self._head

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals --

    def _append(
        self,
        event: str,
        tenant: str | None,
        model_id: str | None,
        sha256: str | None,
        detail: dict[str, str | int],
        prefix: bytes,
    ) -> AuditEntry:
        """Builds the next entry and writes `prefix` + its line; the caller holds the lock."""
        if self._closed:
            raise AuditLogError("the audit log is closed")
        if self._failed is not None:
            self._undo_failed_write()
        when = float(self._clock())
        if not math.isfinite(when) or when < 0:
            raise AuditLogError(f"the clock returned {when!r}")
        entry = _finish(
            self._seq + 1, round(when, 6), event, tenant, model_id, sha256, detail, self._head
        )
        self._write(prefix + entry.line + b"\n")
        self._seq, self._head = entry.seq, entry.hash
        if self._memory is not None:
            self._memory.append(entry)
        return entry

    def _write(self, data: bytes) -> None:
        """One append (looping only on a short write) and fsync.

        A failure (a full disk, an I/O error) may leave part of `data` in the file, and
        appending after it would merge lines, so the log refuses to append until
        `_undo_failed_write` has cut those bytes off again; the next append tries that
        first, so the log recovers by itself once the disk does (no restart).
        """
        if self._fd is None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            self._failed = exc
            raise AuditLogError(f"could not write the audit log: {exc.strerror or exc}") from exc
        self._size += len(data)

    def _undo_failed_write(self) -> None:
        """Truncates the file back to its last durable entry (the caller holds the lock).

        The bytes after it belong to the entry whose write failed: its caller was told it
        was not recorded (and a management operation was refused), so they must not stand
        as if it had been. Unlike a torn tail found at open (which may come from anyone's
        crash and is recorded with ``chain_repair``), these bytes are known to be this
        process's own unacknowledged write: the file is exclusively ours (flock). Shrinking
        a file needs no free space, so this works on a full disk; if it fails anyway the
        log stays refusing and the next append tries again.
        """
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError as exc:
            raise AuditLogError(
                f"an earlier write failed ({self._failed}) and could not be undone yet: "
                f"{exc.strerror or exc}"
            ) from exc
        log.warning("audit log: a failed write was undone; appending again")
        self._failed = None

    @staticmethod
    def _open(path: Path) -> int:
        existed = path.exists()
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise AuditLogError(f"cannot open audit log {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise AuditLogInUseError(f"audit log {path} is in use by another process") from exc
        if not existed:  # make the new directory entry durable too
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return fd

    def _recover(self) -> None:
        """Continues the chain from the last valid entry; repairs a torn tail (see module)."""
        assert self._fd is not None
        size = self._size = os.fstat(self._fd).st_size
        if size == 0:
            return
        start = max(0, size - _TAIL_SCAN_BYTES)
        data = _pread_all(self._fd, size - start, start)
        if start > 0:
            cut = data.find(b"\n")
            if cut < 0:
                raise AuditLogError(f"audit log {self._path}: no line ends in its last MiB")
            data, start = data[cut + 1 :], start + cut + 1
        complete_end = data.rfind(b"\n") + 1
        lines = data[:complete_end].split(b"\n")[:-1]
        last: AuditEntry | None = None
        damage_from = 0  # offset in `data` after the last valid complete line
        offset = complete_end
        for line in reversed(lines):
            offset -= len(line) + 1
            try:
                last = parse_entry(line)
            except AuditLogError:
                continue
            damage_from = offset + len(line) + 1
            break
        if last is None and start > 0:
            raise AuditLogError(f"audit log {self._path}: no valid entry in its last MiB")
        if last is not None:
            self._seq, self._head = last.seq, last.hash
        damaged = data[damage_from:]
        if not damaged:
            return
        if damaged.endswith(b"\n"):
            bad = data[damage_from:].split(b"\n", 1)[0]
            try:
                parse_entry(bad)
            except AuditLogError as exc:
                reason = str(exc)
            else:  # unreachable in practice: a valid line would have been `last`
                reason = "unexpected"
            raise AuditLogError(
                f"audit log {self._path}: the line at byte {start + damage_from} is not a valid "
                f"entry ({reason}) and the file ends with a complete line, so this is not a "
                "torn write: run `blindinfer audit verify` and move the file aside"
            )
        with self._lock:
            if b"\n" not in damaged:
                try:  # the whole entry reached the disk, only its newline did not
                    entry = parse_entry(damaged)
                except AuditLogError:
                    entry = None
                if entry is not None and (entry.seq, entry.prev) == (self._seq + 1, self._head):
                    self._write(b"\n")
                    self._seq, self._head = entry.seq, entry.hash
                    log.warning(
                        "audit log %s: completed a last entry that lost its newline", self._path
                    )
                    return
            region = damaged + b"\n"  # the newline terminates the torn bytes
            self.repair = self._append(
                AuditEvent.CHAIN_REPAIR.value,
                None,
                None,
                None,
                {
                    "reason": "torn_tail",
                    "damaged_bytes": len(region),
                    "damaged_sha256": hashlib.sha256(region).hexdigest(),
                },
                prefix=b"\n",
            )
        log.warning(
            "audit log %s: torn tail of %d bytes after seq %d; recorded chain_repair seq %d",
            self._path,
            len(damaged),
            self.repair.seq - 1,
            self.repair.seq,
        )


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


# --- verification ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditVerification:
    """`problems` is empty for an intact chain; each names the first line it concerns.

    `repairs` lists the torn tails that the chain itself records (``chain_repair``
    entries whose damaged bytes are present and match): the log lost the entry being
    written at a crash, and says so.
    """

    entries: int
    head: str
    """Hash of the last valid entry (64 zeros if none)."""
    problems: list[str]
    repairs: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


class _Damage:
    """Invalid lines since the last valid entry: a repair must commit to exactly these."""

    def __init__(self, first_line: int) -> None:
        self.first_line = first_line
        self.last_line = first_line
        self.problems: list[str] = []
        self.size = 0
        self.digest = hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.size += len(data)
        self.digest.update(data)


def verify_audit_log(path: Path, *, anchor: str | None = None) -> AuditVerification:
    """Checks every line: canonical JSON entry, its hash, contiguous seq and prev links.

    `anchor`, a head hash recorded elsewhere (at shutdown, in a receipt), must be the hash
    of an entry still in the log: that is what detects truncation of the tail. Raises
    OSError only if the file cannot be read; any content yields problems, never a crash.
    """
    if anchor is not None and _HEX64.fullmatch(anchor) is None:
        raise ValueError("anchor must be 64 lowercase hex digits")
    problems: list[str] = []
    repairs: list[str] = []
    entries, expected_seq, prev, prev_line, head = 0, 1, GENESIS, 0, GENESIS
    anchor_found = False
    damage: _Damage | None = None
    lineno = 0
    with path.open("rb") as f:
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            terminated = raw.endswith(b"\n")
            if not terminated and len(raw) > MAX_LINE_BYTES:
                damage = damage or _Damage(lineno)
                damage.add(raw)
                terminated = _skip_long_line(f, damage)
                damage.last_line = lineno
                damage.problems.append(f"line {lineno}: longer than {MAX_LINE_BYTES} bytes")
                continue
            try:
                entry = parse_entry(raw[:-1] if terminated else raw)
            except AuditEntryMismatch as exc:  # an edit: report it, go on from its claims
                if damage is not None:
                    problems.extend(damage.problems)
                    damage = None
                problems.append(f"line {lineno}: {exc}")
                expected_seq, prev, prev_line = exc.seq + 1, exc.claimed_hash, lineno
                continue
            except AuditLogError as exc:
                damage = damage or _Damage(lineno)
                damage.add(raw)
                damage.last_line = lineno
                torn = "" if terminated else " (torn last line: no newline; not yet repaired)"
                damage.problems.append(f"line {lineno}: {exc}{torn}")
                continue
            links: list[str] = []
            if entry.seq != expected_seq:
                links.append(f"seq {entry.seq}, expected {expected_seq} (missing or moved entry)")
            if entry.prev != prev:
                where = f"line {prev_line}" if prev_line else "genesis"
                links.append(f"prev does not match the hash of the entry before ({where})")
            is_repair = entry.event == AuditEvent.CHAIN_REPAIR
            if damage is not None:
                if is_repair and not links and _commits_to(entry, damage):
                    repairs.append(
                        f"line {lineno}: chain_repair after seq {entry.seq - 1}: "
                        f"{damage.size} damaged bytes on lines "
                        f"{damage.first_line}-{damage.last_line} (torn write), recorded"
                    )
                else:
                    problems.extend(damage.problems)
                damage = None
            elif is_repair:
                links.append("chain_repair entry, but the damaged bytes it records are gone")
            if not terminated:
                links.append("last line has no newline (torn write; repaired at next open)")
            if links:
                problems.append(f"line {lineno}: " + "; ".join(links))
            entries += 1
            expected_seq, prev, prev_line, head = entry.seq + 1, entry.hash, lineno, entry.hash
            anchor_found = anchor_found or entry.hash == anchor
    if damage is not None:
        problems.extend(damage.problems)
    if anchor is not None and not anchor_found:
        problems.append(
            f"line {lineno + 1} (end of file): no entry has the anchored hash {anchor}: "
            "the log was truncated or replaced"
        )
    return AuditVerification(entries=entries, head=head, problems=problems, repairs=repairs)


def _skip_long_line(f: IO[bytes], damage: _Damage) -> bool:
    """Reads the rest of an over-long line into the damage; True if it had a newline."""
    while chunk := f.readline(1 << 16):
        damage.add(chunk)
        if chunk.endswith(b"\n"):
            return True
    return False


def _commits_to(entry: AuditEntry, damage: _Damage) -> bool:
    detail = entry.detail
    return (
        detail.get("reason") == "torn_tail"
        and detail.get("damaged_bytes") == damage.size
        and detail.get("damaged_sha256") == damage.digest.hexdigest()
    )
