"""Issue 21 items 9-11 against real server processes: a full disk and a failing audit log
(real tmpfs filesystems, filled to the last byte), BlindAI `/run` with an overflowing
shape, and /metrics forgetting deleted models.

- The audit log's filesystem is full (the store's is not): an upload is refused with 507
  ``storage_full`` and nothing is stored; once the disk has room the same server (no
  restart) records and accepts again, and the chain verifies.
- The store's filesystem is full: an upload is 507 ``storage_full`` (it was a 500
  ``internal_error``), and a delete still succeeds (it wrote a manifest before freeing).
- BlindAI ``fact = [0, 2**64 - 1]`` with empty data: 400, no traceback in the server's
  log, and the same keep-alive connection serves the next request.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import blindinfer
from blindinfer.cli.demo_model import INPUT_NAME, demo_input, demo_model
from blindinfer.client.transport import pinned_context
from blindinfer.server.blindai import cbor
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support import onnx_models
from support.fulldisk import fill, make_room, small_filesystem
from support.training_info_models import model_with_training_info

from .conftest import policy_for

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def _connect(server: ServerProcess, *, model_names: bool = False) -> blindinfer.Client:
    config = ServerConfig(
        simulation=True, limits=Limits(workers=1), metrics_model_names=model_names
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(server.url, policy=policy_for(config), simulation=True)


@contextmanager
def _server(store: Path, log: Path, *extra: str) -> Iterator[ServerProcess]:
    with (
        log.open("w") as stderr,
        start_server(
            ["--simulation", "--workers=1", f"--store-dir={store}", *extra], stderr=stderr
        ) as server,
    ):
        yield server


def _model(seed: int) -> bytes:
    return onnx_models.model_bytes(onnx_models.mlp_model(seed=seed))


def _events(store: Path) -> list[str]:
    text = (store / "audit.log").read_text()
    return [json.loads(line)["event"] for line in text.splitlines()]


def _verify(log: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", "audit", "verify", str(log), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _no_traceback(log: Path) -> None:
    text = log.read_text()
    assert "Traceback" not in text and 'File "' not in text, text[-3000:]


def test_upload_is_refused_when_its_audit_entry_cannot_be_written(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    log = tmp_path / "server.log"
    with small_filesystem(1 * MiB) as audit_disk:
        (store / "audit.log").symlink_to(audit_disk / "audit.log")
        with _server(store, log) as server, _connect(server) as client:
            filler = fill(audit_disk)
            stored: list[str] = []
            refused: blindinfer.ServerError | None = None
            for seed in range(40):  # the log's last page holds a few more entries at most
                try:
                    stored.append(client.upload_model(_model(seed), name=f"m{seed}").model_id)
                except blindinfer.ServerError as exc:
                    refused = exc
                    break
            assert refused is not None and len(stored) < 20
            assert (refused.status, refused.code) == (507, "storage_full")
            # nothing of the refused upload stayed: not listed, and its name is free
            assert sorted(m.model_id for m in client.list_models()) == sorted(stored)
            with pytest.raises(blindinfer.ServerError) as again:  # still full: still refused
                client.delete_model(stored[0])
            assert again.value.code == "storage_full"
            assert len(client.list_models()) == len(stored)
            make_room(filler)
            # the same server, no restart: the log records again, the operations succeed
            late = client.upload_model(_model(len(stored)), name=f"m{len(stored)}")
            client.delete_model(stored[0])
            listed = {m.model_id for m in client.list_models()}
            assert listed == {*stored[1:], late.model_id}
        events = _events(store)
        assert events.count("upload") == len(stored) + 1
        assert events.count("delete") == 1
        assert events[0] == "server_start" and events[-1] == "server_stop"
        assert _verify(store / "audit.log")["entries"] == len(events)
        _no_traceback(log)
        # what was acknowledged survives a restart; what was refused does not exist
        with _server(store, log) as server, _connect(server) as client:
            assert {m.model_id for m in client.list_models()} == listed


def test_full_store_disk_is_507_and_delete_still_works(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with small_filesystem(8 * MiB) as disk:
        store = disk / "store"
        with _server(store, log) as server, _connect(server) as client:
            kept = client.upload_model(_model(1), name="kept")
            doomed = client.upload_model(_model(2), name="doomed")
            filler = fill(disk)
            with pytest.raises(blindinfer.ServerError) as full:
                client.upload_model(_model(3), name="new")
            assert (full.value.status, full.value.code) == (507, "storage_full")
            client.delete_model(doomed.model_id)  # commits on the full disk
            assert [m.model_id for m in client.list_models()] == [kept.model_id]
            x = np.ones((1, 64), np.float32)
            assert client.run_model(kept.model_id, {"x": x})["probabilities"].shape[0] == 1
            make_room(filler)
            client.upload_model(_model(3), name="new")
        assert _events(store) == [
            "server_start",
            "upload",
            "upload",
            "delete",
            "upload",
            "server_stop",
        ]
        assert _verify(store / "audit.log")["entries"] == 6
    _no_traceback(log)


# --- BlindAI /run with an overflowing shape ---------------------------------------------


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _exchange(conn: ssl.SSLSocket, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 POST /run on an open keep-alive connection."""
    head = (
        f"POST /run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    )
    conn.sendall(head.encode() + body)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    raw_head, rest = data.split(b"\r\n\r\n", 1)
    lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = conn.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def _tensor(fact: list[int], data: bytes) -> dict[str, Any]:
    return {"info": {"fact": fact, "datum_type": 0, "node_name": None}, "bytes_data": data}


def _run_body(model_id: str, tensors: list[dict[str, Any]]) -> bytes:
    return cbor.dumps(
        {"model_id": model_id, "model_hash": "", "inputs": tensors, "client_info": None}
    )


def test_blindai_run_with_an_overflowing_shape_is_a_clean_400(tmp_path: Path) -> None:
    attestation, run, management = _free_ports(3)
    log = tmp_path / "server.log"
    ports = f"--blindai-ports={attestation},{run},{management}"
    with (
        log.open("w") as stderr,
        start_server(["--simulation", "--workers=1", "--blindai-compat", ports], stderr=stderr),
    ):
        der = cbor.loads(httpx.get(f"http://127.0.0.1:{attestation}/").content)
        context = pinned_context(der)
        model = demo_model()
        upload = {
            "model": model,
            "length": len(model),
            "model_name": "demo.onnx",
            "optimize": True,
            "client_info": {},
        }
        with httpx.Client(verify=context) as raw:
            reply = raw.post(f"https://127.0.0.1:{management}/upload", content=cbor.dumps(upload))
        assert reply.status_code == 200, reply.content
        model_id = cbor.loads(reply.content)["model_id"]
        x = demo_input()[INPUT_NAME]
        good = _run_body(model_id, [_tensor(list(x.shape), x.tobytes())])
        with (
            socket.create_connection(("127.0.0.1", run)) as plain,
            context.wrap_socket(plain, server_hostname="127.0.0.1") as conn,
        ):
            for fact in ([0, 2**64 - 1], [0, 2**63 - 1], [0, 2**40, 2**40]):
                status, headers, body = _exchange(conn, _run_body(model_id, [_tensor(fact, b"")]))
                assert status == 400, body
                assert headers["x-blindinfer-error-code"] == "invalid_request"
                assert "fact" in cbor.loads(body)
                assert headers.get("connection", "").lower() != "close"
                # the same connection serves the next request
                status, _, body = _exchange(conn, good)
                assert status == 200, body
                outputs = cbor.loads(body)["outputs"]
                assert outputs and outputs[0]["info"]["fact"][0] == x.shape[0]
    _no_traceback(log)
    assert "Exception in ASGI application" not in log.read_text()


# --- /metrics forgets deleted models ----------------------------------------------------


def test_metrics_forget_deleted_model_names(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with (
        log.open("w") as stderr,
        start_server(
            ["--simulation", "--workers=1", "--metrics-model-names"], stderr=stderr
        ) as server,
        _connect(server, model_names=True) as client,
        httpx.Client(verify=pinned_context(client.attestation.certificate_der)) as raw,
    ):
        x = np.ones((1, 64), np.float32)
        for name in ("tenant-secret-name", "kept-name"):
            info = client.upload_model(_model(7 if name == "kept-name" else 8), name=name)
            client.run_model(info.model_id, {"x": x})
            if name == "tenant-secret-name":
                doomed = info
        before = raw.get(server.url + "/metrics").text
        assert 'model="tenant-secret-name"' in before and 'model="kept-name"' in before
        client.delete_model(doomed.model_id)
        after = raw.get(server.url + "/metrics").text
        assert "tenant-secret-name" not in after
        assert 'model="kept-name"' in after
    _no_traceback(log)


def test_upload_with_external_data_in_training_info_is_refused(
    client: blindinfer.Client,
) -> None:
    for where in ("initialization", "algorithm", "algorithm-node"):
        with pytest.raises(blindinfer.ServerError) as refused:
            client.upload_model(model_with_training_info(external_in=where), name=f"ti-{where}")
        assert (refused.value.status, refused.value.code) == (400, "invalid_model")
        assert "external data" in refused.value.message
    assert not [m for m in client.list_models() if m.name.startswith("ti-")]
