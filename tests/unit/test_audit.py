"""The audit log: exact entries and hashes recomputed here by hand, tampering (edit, delete,
insert, reorder, truncate) named by line, torn tails repaired in the chain, concurrent
appends, bounded details, the CLI, and arbitrary bytes never crashing the verifier."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.cli.audit import run_audit
from blindinfer.server.audit import (
    GENESIS,
    AuditEvent,
    AuditFieldError,
    AuditLog,
    AuditLogError,
    parse_entry,
    verify_audit_log,
)

SHA = "ab" * 32
MODEL_ID = "m-" + "0123456789abcdef" * 2


def _clock(start: float = 1700000000.25, step: float = 1.0) -> Callable[[], float]:
    times = iter(start + i * step for i in range(10_000))
    return lambda: next(times)


def _write_log(path: Path, n: int) -> list[bytes]:
    with AuditLog(path, clock=_clock()) as audit:
        audit.record("server_start", detail={"version": "0.1.0"})
        for i in range(n - 1):
            audit.record("upload", tenant="acme", model_id=MODEL_ID, sha256=SHA, detail={"i": i})
    return path.read_bytes().splitlines(keepends=True)


def _problem_lines(path: Path) -> list[int]:
    return [int(p.split(":")[0].split()[1]) for p in verify_audit_log(path).problems]


# --- exact entries ---------------------------------------------------------------------


def test_exact_entries_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, clock=_clock()) as audit:
        first = audit.record("server_start")
        second = audit.record(
            AuditEvent.UPLOAD,
            tenant="acme",
            model_id=MODEL_ID,
            sha256=SHA,
            detail={"size": 1234, "reason": "new"},
        )
    body1 = (
        '{"detail":{},"event":"server_start","model_id":null,"prev":"' + "0" * 64 + '",'
        '"seq":1,"sha256":null,"tenant":null,"time":1700000000.25}'
    )
    hash1 = hashlib.sha256(body1.encode()).hexdigest()
    line1 = body1[:-1].replace('"model_id"', f'"hash":"{hash1}","model_id"') + "}"
    body2 = (
        '{"detail":{"reason":"new","size":1234},"event":"upload","model_id":"' + MODEL_ID + '",'
        '"prev":"' + hash1 + '","seq":2,"sha256":"' + SHA + '","tenant":"acme",'
        '"time":1700000001.25}'
    )
    hash2 = hashlib.sha256(body2.encode()).hexdigest()
    line2 = body2.replace('"model_id"', f'"hash":"{hash2}","model_id"')
    assert path.read_text() == line1 + "\n" + line2 + "\n"
    assert (first.hash, second.hash, second.prev) == (hash1, hash2, hash1)
    assert (first.seq, second.seq, first.prev) == (1, 2, GENESIS)
    assert dict(second.detail) == {"size": 1234, "reason": "new"}
    assert json.loads(line2)["hash"] == hash2
    result = verify_audit_log(path)
    assert (result.entries, result.head, result.problems, result.repairs) == (2, hash2, [], [])


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write_log(path, 3)
    with AuditLog(path, clock=_clock(1800000000)) as audit:
        assert audit.seq == 3
        entry = audit.record("server_stop")
    assert entry.seq == 4
    assert verify_audit_log(path).entries == 4
    assert verify_audit_log(path).intact


def test_empty_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b"")
    assert verify_audit_log(path) == verify_audit_log(path)
    assert (verify_audit_log(path).entries, verify_audit_log(path).head) == (0, GENESIS)
    with pytest.raises(FileNotFoundError):
        verify_audit_log(tmp_path / "absent.log")


# --- tampering -------------------------------------------------------------------------


def test_edited_field_names_that_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 6)
    lines[3] = lines[3].replace(b'"tenant":"acme"', b'"tenant":"evil"')
    path.write_bytes(b"".join(lines))
    result = verify_audit_log(path)
    assert _problem_lines(path) == [4]
    assert "hash does not match" in result.problems[0]
    assert result.entries == 5


def test_edit_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 6)
    value = json.loads(lines[2])
    value["tenant"] = "evil"
    del value["hash"]
    digest = hashlib.sha256(
        json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    value["hash"] = digest
    lines[2] = json.dumps(value, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    assert _problem_lines(path) == [4]
    assert "prev does not match" in verify_audit_log(path).problems[0]


def test_deleted_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 6)
    del lines[2]
    path.write_bytes(b"".join(lines))
    result = verify_audit_log(path)
    assert _problem_lines(path) == [3]
    assert "seq 4, expected 3" in result.problems[0]


def test_inserted_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 6)
    path.write_bytes(b"".join([*lines[:3], b'{"event":"delete"}\n', *lines[3:]]))
    assert _problem_lines(path) == [4]
    path.write_bytes(b"".join([*lines[:4], lines[1], *lines[4:]]))  # a valid, replayed entry
    assert _problem_lines(path)[0] == 5


def test_reordered_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 6)
    lines[2], lines[3] = lines[3], lines[2]
    path.write_bytes(b"".join(lines))
    problems = _problem_lines(path)
    assert problems[0] == 3
    assert all(line in (3, 4, 5) for line in problems)


def test_whitespace_rewrite_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 3)
    lines[1] = json.dumps(json.loads(lines[1]), sort_keys=True).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    assert _problem_lines(path) == [2]
    assert "canonical" in verify_audit_log(path).problems[0]


def test_truncation_needs_an_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 5)
    head = verify_audit_log(path).head
    assert verify_audit_log(path, anchor=head).intact
    path.write_bytes(b"".join(lines[:3]))
    assert verify_audit_log(path).intact  # the chain alone cannot see a cut tail
    result = verify_audit_log(path, anchor=head)
    assert not result.intact
    assert result.problems[0].startswith("line 4 (end of file): no entry has the anchored hash")


# --- torn tails ------------------------------------------------------------------------


def test_torn_last_line_is_repaired_in_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 4)
    last_valid = json.loads(lines[-1])["hash"]
    torn = lines[-1][:37]  # a crash in the middle of writing a fifth entry
    path.write_bytes(b"".join(lines) + torn)
    before = verify_audit_log(path)
    assert _problem_lines(path) == [5]
    assert "torn last line" in before.problems[0]
    with pytest.raises(AuditLogError):  # the tail is damaged, not yet repaired
        parse_entry(torn)

    with AuditLog(path, clock=_clock(1900000000)) as audit:
        repair = audit.repair
        assert repair is not None
        assert (repair.event, repair.seq, repair.prev) == ("chain_repair", 5, last_valid)
        region = torn + b"\n"
        assert dict(repair.detail) == {
            "reason": "torn_tail",
            "damaged_bytes": len(region),
            "damaged_sha256": hashlib.sha256(region).hexdigest(),
        }
        after = audit.record("server_start")
    assert after.prev == repair.hash
    assert path.read_bytes() == b"".join(lines) + torn + b"\n" + repair.line + b"\n" + (
        after.line + b"\n"
    )
    result = verify_audit_log(path)
    assert result.problems == []
    assert result.entries == 6
    assert result.head == after.hash
    assert len(result.repairs) == 1
    assert result.repairs[0].startswith("line 6: chain_repair after seq 4")

    with AuditLog(path) as audit:  # a clean reopen writes no second repair
        assert audit.repair is None
        assert audit.seq == 6


def test_crash_during_the_repair_itself(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 3)
    path.write_bytes(b"".join(lines) + b'{"seq":4,"ti' + b"\n" + b'{"seq":4,"event":"ch')
    with AuditLog(path) as audit:
        assert audit.repair is not None
        assert audit.repair.seq == 4
    result = verify_audit_log(path)
    assert result.intact
    assert "on lines 4-5" in result.repairs[0]


def test_torn_first_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"detail":{},"ev')
    with AuditLog(path) as audit:
        assert audit.repair is not None
        assert (audit.repair.seq, audit.repair.prev) == (1, GENESIS)
    assert verify_audit_log(path).intact


def test_entry_that_only_lost_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 3)
    path.write_bytes(b"".join(lines)[:-1])
    assert "no newline" in verify_audit_log(path).problems[0]
    with AuditLog(path) as audit:
        assert audit.repair is None
        assert audit.seq == 3
    assert path.read_bytes() == b"".join(lines)
    assert verify_audit_log(path).intact


def test_complete_invalid_last_line_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 3)
    path.write_bytes(b"".join(lines) + b"not an entry\n")
    with pytest.raises(AuditLogError, match="not a torn write"):
        AuditLog(path)
    assert path.read_bytes() == b"".join(lines) + b"not an entry\n"  # untouched


def test_removed_torn_bytes_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 3)
    path.write_bytes(b"".join(lines) + b"torn")
    AuditLog(path).close()
    repaired = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(repaired[:3] + repaired[4:]))  # hide the damaged line
    result = verify_audit_log(path)
    assert _problem_lines(path) == [4]
    assert "damaged bytes it records are gone" in result.problems[0]


def test_forged_repair_does_not_excuse_damage(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 3)
    path.write_bytes(b"".join(lines) + b"torn")
    AuditLog(path).close()
    repaired = path.read_bytes().splitlines(keepends=True)
    repaired[3] = b"TORN\n"  # different damaged bytes than the repair commits to
    path.write_bytes(b"".join(repaired))
    assert _problem_lines(path) == [4]


# --- writer behaviour ------------------------------------------------------------------


def test_concurrent_appends_keep_a_valid_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    threads, per_thread = 8, 25
    with AuditLog(path) as audit:
        barrier = threading.Barrier(threads)

        def work(t: int) -> None:
            barrier.wait()
            for i in range(per_thread):
                audit.record("auth_failure", detail={"thread": t, "i": i})

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    result = verify_audit_log(path)
    assert result.problems == []
    assert result.entries == threads * per_thread
    seen = {(e["detail"]["thread"], e["detail"]["i"]) for e in map(json.loads, path.open("rb"))}
    assert len(seen) == threads * per_thread


def test_memory_mode() -> None:
    with AuditLog(None, clock=lambda: 5.0) as audit:
        a = audit.record("delete", model_id=MODEL_ID)
        b = audit.record("evict", model_id=MODEL_ID, detail={"reason": "lru"})
        assert audit.entries == (a, b)
        assert audit.head == b.hash
        assert (a.prev, b.prev, a.time) == (GENESIS, a.hash, 5.0)
        assert parse_entry(b.line) == b


def test_second_process_cannot_share_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path), pytest.raises(AuditLogError, match="in use"):
        AuditLog(path)
    AuditLog(path).close()  # released on close


def test_close_logs_the_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    entry = audit.record("server_stop")
    with caplog.at_level(logging.WARNING, logger="blindinfer.server.audit"):
        assert audit.close() == entry.hash
        audit.close()  # idempotent, logs once
    assert [entry.hash in r.getMessage() for r in caplog.records] == [True]
    with pytest.raises(AuditLogError, match="closed"):
        audit.record("server_start")


def test_file_mode_is_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    AuditLog(path).close()
    assert path.stat().st_mode & 0o777 == 0o600


# --- what may be recorded --------------------------------------------------------------


@pytest.mark.parametrize(
    "detail",
    [
        {"data": b"\x00\x01"},
        {"data": bytearray(4)},
        {"x": 1.5},
        {"x": [1, 2, 3]},
        {"x": np.ones(4, np.float32)},
        {"x": np.int64(3)},
        {"flag": True},
        {"x": None},
        {"x": "a" * 257},
        {"x": "line\nbreak"},
        {"x": "caf\u00e9"},
        {"x": 2**63},
        {"Key": "v"},
        {"k" * 33: "v"},
        {1: "v"},
        {f"k{i}": i for i in range(9)},
    ],
)
def test_detail_is_bounded(detail: dict[object, object]) -> None:
    audit = AuditLog(None)
    with pytest.raises(AuditFieldError):
        audit.record("upload", detail=detail)  # type: ignore[arg-type]
    assert audit.seq == 0  # nothing recorded


def test_largest_entry_is_accepted_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    detail: dict[str, str | int] = {f"k{i:0>31}": '"\\' * 128 for i in range(8)}
    with AuditLog(path) as audit:
        entry = audit.record(
            "quota_refusal", tenant="t" * 64, model_id=MODEL_ID, sha256=SHA, detail=detail
        )
        audit.record("share", detail={"a": -(2**63), "b": 2**63 - 1})
    assert dict(entry.detail) == detail
    assert len(entry.line) > 4096
    assert verify_audit_log(path).intact


@pytest.mark.parametrize(
    ("kwargs", "event"),
    [
        ({"model_id": "classifier"}, "upload"),  # a model name is user data
        ({"sha256": "AB" * 32}, "upload"),
        ({"tenant": "x" * 65}, "upload"),
        ({"tenant": "a b"}, "upload"),
        ({}, "chain_repair"),
        ({}, "reboot"),
    ],
)
def test_fields_and_events_are_checked(kwargs: dict[str, str], event: str) -> None:
    with pytest.raises(AuditFieldError):
        AuditLog(None).record(
            event,
            tenant=kwargs.get("tenant"),
            model_id=kwargs.get("model_id"),
            sha256=kwargs.get("sha256"),
        )


def test_every_documented_event_is_recordable() -> None:
    audit = AuditLog(None)
    kinds = [e.value for e in AuditEvent if e is not AuditEvent.CHAIN_REPAIR]
    assert kinds == [
        "upload", "replace", "delete", "share", "evict", "restore",
        "auth_failure", "quota_refusal", "server_start", "server_stop",
    ]  # fmt: skip
    for kind in kinds:
        audit.record(kind)
    assert audit.seq == len(kinds)


def test_bad_clock_is_refused() -> None:
    with pytest.raises(AuditLogError):
        AuditLog(None, clock=lambda: float("nan")).record("server_start")


# --- CLI -------------------------------------------------------------------------------


def _args(path: Path, *, as_json: bool = False, anchor: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(
        command="audit", audit_command="verify", path=path, json=as_json, anchor=anchor
    )


def test_cli_intact_and_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, 3)
    head = json.loads(lines[-1])["hash"]
    assert run_audit(_args(path)) == 0
    out = capsys.readouterr().out
    assert "entries  3" in out
    assert f"head     {head}" in out
    assert "intact" in out

    lines[1] = lines[1].replace(b"acme", b"evil")
    path.write_bytes(b"".join(lines))
    assert run_audit(_args(path)) == 1
    out = capsys.readouterr().out
    assert "BROKEN (1 problems)" in out
    assert "  - line 2: hash does not match" in out

    assert run_audit(_args(path, as_json=True)) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["intact"] is False
    assert document["entries"] == 2
    assert document["problems"][0].startswith("line 2:")


def test_cli_anchor_and_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.log"
    _write_log(path, 2)
    assert run_audit(_args(path, anchor="cd" * 32)) == 1
    assert "anchored hash" in capsys.readouterr().out
    assert run_audit(_args(path, anchor="not hex")) == 1
    assert run_audit(_args(tmp_path / "absent.log")) == 1
    assert "cannot verify" in capsys.readouterr().err


# --- arbitrary bytes -------------------------------------------------------------------

_PIECES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"\n", b"{", b"}", b'"seq":1', b"[" * 5000, b"1" * 5000, b"\xff", b"NaN"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix_entries=st.integers(0, 3),
    garbage=st.lists(_PIECES, max_size=8).map(b"".join),
    long_line=st.booleans(),
)
def test_arbitrary_bytes_never_crash(prefix_entries: int, garbage: bytes, long_line: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.log"
        prefix = b""
        if prefix_entries:
            prefix = b"".join(_write_log(path, prefix_entries))
        data = prefix + garbage + (b"x" * 10_000 if long_line else b"")
        path.write_bytes(data)
        result = verify_audit_log(path)
        assert result.entries >= 0
        assert all(p.startswith("line ") for p in result.problems)
        if not garbage and not long_line:
            assert result.intact
        # Opening either refuses with AuditLogError or leaves a tail that verifies.
        try:
            audit = AuditLog(path)
        except AuditLogError:
            return
        audit.close()
        after = verify_audit_log(path)
        last_line = data.count(b"\n") + 1
        assert all(int(p.split(":")[0].split()[1]) <= last_line for p in after.problems)
        assert after.head == audit.head
