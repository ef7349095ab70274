"""Issue 21 item 9 and 10, in-process: a failed audit write refuses the operation and
leaves no change, the audit log recovers by itself once the disk has room, a delete
commits on a full disk, ENOSPC is 507 ``storage_full`` (never a 500), and no exception
escapes either app to uvicorn (which would log a traceback and drop the connection).

The full disk is a real tmpfs (tests/support/fulldisk.py; skipped without root); the
partial-write case also runs without root, with `os.write` failing half-way.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path

import cbor2
import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from blindinfer.server.app import build_state, create_app
from blindinfer.server.audit import AuditLog, AuditLogError, verify_audit_log
from blindinfer.server.blindai import blindai_apps
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.errors import status_and_code
from blindinfer.server.tls import make_tls_identity
from blindinfer.store.sealed import (
    RESERVE_NAME,
    ModelRecord,
    SealedStore,
    is_disk_full,
)
from blindinfer.tee.simulation.platform import SimulationPlatform
from support.fulldisk import fill, make_room, small_filesystem

KEY = bytes(range(32))
SHA = "ab" * 32
MODEL_ID = "m-" + "0123456789abcdef" * 2
MiB = 1 << 20


def _record(data: bytes, name: str = "m") -> ModelRecord:
    return ModelRecord(
        model_id=f"m-{os.urandom(16).hex()}",
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        owner="alice",
        size=len(data),
        created_at=1000.0,
    )


# --- the audit log ---------------------------------------------------------------------


def test_audit_log_recovers_after_a_partial_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that got half an entry onto the disk, then ENOSPC: the record is refused,
    and the next one (once writes work) cuts the half entry off and appends normally."""
    path = tmp_path / "audit.log"
    audit = AuditLog(path)
    audit.record("server_start")
    real_write = os.write

    def half_then_full(fd: int, data: object) -> int:
        view = memoryview(data)  # type: ignore[arg-type]
        if len(view) > 1:
            return real_write(fd, view[: len(view) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(AuditLogError) as caught:
        audit.record("upload", tenant="acme", model_id=MODEL_ID, sha256=SHA)
    assert is_disk_full(caught.value)
    assert status_and_code(caught.value)[:2] == (507, "storage_full")
    with pytest.raises(AuditLogError):  # still no room: still refused, nothing appended
        audit.record("delete", tenant="acme", model_id=MODEL_ID, sha256=SHA)
    monkeypatch.setattr(os, "write", real_write)
    audit.record("delete", tenant="acme", model_id=MODEL_ID, sha256=SHA)  # no restart
    audit.close()
    result = verify_audit_log(path)
    assert result.intact and not result.repairs, result.problems
    assert [e.split(b'"event":"')[1].split(b'"')[0] for e in path.read_bytes().splitlines()] == [
        b"server_start",
        b"delete",
    ]


def test_audit_log_on_a_full_disk_refuses_then_recovers(tmp_path: Path) -> None:
    with small_filesystem(1 * MiB) as disk:
        audit = AuditLog(disk / "audit.log")
        audit.record("server_start")
        filler = fill(disk)
        written = 1
        failure: AuditLogError | None = None
        for _ in range(100):  # the log's last page has room for a few entries at most
            try:
                audit.record("upload", tenant="acme", model_id=MODEL_ID, sha256=SHA)
            except AuditLogError as exc:
                failure = exc
                break
            written += 1
        assert failure is not None and written < 20 and is_disk_full(failure)
        size = (disk / "audit.log").stat().st_size
        make_room(filler)
        audit.record("delete", tenant="acme", model_id=MODEL_ID, sha256=SHA)
        audit.close()
        result = verify_audit_log(disk / "audit.log")
        assert result.intact and not result.repairs, result.problems
        assert result.entries == written + 1
        assert (disk / "audit.log").stat().st_size > size


def test_audit_errors_map_to_structured_codes() -> None:
    assert status_and_code(OSError(errno.ENOSPC, "No space left on device"))[:2] == (
        507,
        "storage_full",
    )
    assert status_and_code(OSError(errno.EDQUOT, "Disk quota exceeded"))[:2] == (
        507,
        "storage_full",
    )
    assert status_and_code(AuditLogError("the audit log is closed"))[:2] == (
        503,
        "audit_unavailable",
    )
    assert "/secret" not in status_and_code(OSError(errno.ENOSPC, "x", "/secret/path"))[2]


# --- the sealed store ------------------------------------------------------------------


def test_a_failing_before_commit_changes_nothing(tmp_path: Path) -> None:
    store = SealedStore(tmp_path, KEY, max_bytes=MiB)
    kept = b"kept model"
    kept_record = _record(kept)
    store.put(kept_record, kept)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def refuse() -> None:
        raise AuditLogError("no audit")

    data = b"new model"
    with pytest.raises(AuditLogError):
        store.put(_record(data), data, before_commit=refuse)
    with pytest.raises(AuditLogError):
        store.delete(kept_record.model_id, before_commit=refuse)
    shared = replace(kept_record, shared_with=("bob",))
    with pytest.raises(AuditLogError):
        store.update_record(shared, before_commit=refuse)
    assert store.records() == [kept_record] and store.counter == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files
    reopened = SealedStore(tmp_path, KEY, max_bytes=MiB)
    assert reopened.records() == [kept_record] and reopened.get(kept_record.model_id) == kept
    calls: list[str] = []
    reopened.delete(kept_record.model_id, before_commit=lambda: calls.append("audit"))
    assert calls == ["audit"] and reopened.records() == []


def test_delete_commits_on_a_full_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="blindinfer.store.sealed")
    with small_filesystem(4 * MiB) as disk:
        store = SealedStore(disk / "store", KEY, max_bytes=64 * MiB)
        assert (disk / "store" / RESERVE_NAME).stat().st_size >= 256 * 1024
        models = [os.urandom(200_000) for _ in range(3)]
        records = [_record(m, name=f"m{i}") for i, m in enumerate(models)]
        for record, model in zip(records, models, strict=True):
            store.put(record, model)
        filler = fill(disk)
        extra = os.urandom(10_000)
        with pytest.raises(OSError, match="No space") as caught:  # a full disk refuses a put
            store.put(_record(extra), extra)
        assert is_disk_full(caught.value)
        assert status_and_code(caught.value)[:2] == (507, "storage_full")
        audited: list[str] = []
        store.delete(records[0].model_id, before_commit=lambda: audited.append("delete"))
        assert audited == ["delete"]  # but a delete commits, audited first
        assert any("space reserve lets a delete" in r.getMessage() for r in caplog.records)
        store.delete(records[1].model_id)  # and another: the freed space restored the reserve
        assert [r.model_id for r in store.records()] == [records[2].model_id]
        make_room(filler)
        reopened = SealedStore(disk / "store", KEY, max_bytes=64 * MiB)
        assert [r.model_id for r in reopened.records()] == [records[2].model_id]
        assert reopened.get(records[2].model_id) == models[2]
        reopened.put(_record(extra), extra)  # room again: uploads work


# --- nothing escapes to uvicorn --------------------------------------------------------


def _state() -> object:
    config = ServerConfig(simulation=True, limits=Limits(max_models=4))
    return build_state(config, SimulationPlatform(bytes(range(32))), make_tls_identity())


def test_unexpected_exceptions_are_answered_not_reraised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With raise_server_exceptions=True, TestClient raises whatever reaches the ASGI
    server: Starlette's own Exception handler always re-raised."""
    state = _state()

    async def boom(request: object) -> None:
        raise KeyError("m-secret-model-id and /store/path")

    compat = blindai_apps(state)["run"]  # type: ignore[arg-type]
    compat.router.routes.append(Route("/boom", boom, methods=["POST"]))
    native = create_app(state)  # type: ignore[arg-type]
    native.router.routes.append(Route("/boom/{ref}", boom))
    caplog.set_level(logging.INFO)
    with TestClient(compat) as client:
        reply = client.post("/boom", content=b"", headers={"content-type": "application/cbor"})
        assert reply.status_code == 500
        assert reply.headers["x-blindinfer-error-code"] == "internal_error"
        assert isinstance(cbor2.loads(reply.content), str)
    with TestClient(native) as client:  # its lifespan closes the state at the end
        reply = client.get("/boom/secret-name")
        assert reply.status_code == 500
        assert reply.json() == {
            "error": "the server could not process this request",
            "code": "internal_error",
        }
        assert client.get("/v2/health/live").status_code == 200
    logged = [r for r in caplog.records if r.name.startswith("blindinfer")]
    failures = [r for r in logged if "KeyError" in r.getMessage()]
    assert len(failures) == 2
    for record in logged:
        assert record.exc_info is None
        assert "secret" not in record.getMessage() and "/store" not in record.getMessage()
    assert "(POST /boom)" in failures[0].getMessage()
    assert "GET /boom/{ref}" in failures[1].getMessage()


def test_an_unauthenticated_caller_gets_401_while_the_audit_log_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The auth failure goes unrecorded, but the answer must not become a 507 that tells
    a caller without a key about the server's disk."""
    from blindinfer.server.auth import generate_api_key

    key, sha = generate_api_key()
    auth = tmp_path / "auth.toml"
    auth.write_text(
        f'[[tenant]]\nname = "acme"\n[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = "{sha}"\n'
    )
    config = ServerConfig(simulation=True, store_dir=str(tmp_path / "store"), auth_file=str(auth))
    state = build_state(config, SimulationPlatform(bytes(range(32))), make_tls_identity())
    with TestClient(create_app(state)) as client:
        monkeypatch.setattr(
            os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
        )
        wrong = {"authorization": "Bearer bi_" + "0" * 43, "content-type": "application/json"}
        reply = client.post("/v2/repository/index", headers=wrong, content=b"{}")
        monkeypatch.undo()
        assert (reply.status_code, reply.json()["code"]) == (401, "unauthorized")
        right = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        assert client.post("/v2/repository/index", headers=right, content=b"{}").json() == []
