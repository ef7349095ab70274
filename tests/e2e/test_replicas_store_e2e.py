"""Two real servers on one sealed store directory at the same time (issue 12): replicas
sharing a ReadWriteMany volume, each with its own --replica-id (its own audit log).

- An upload through replica A runs on replica B, bit for bit, B having started before it.
- A delete through B: A answers the unknown-model 404 at the next request.
- One name uploaded through both: the second gets the name-conflict 409.
- A second server on the store without --replica-id does not start: one line that says
  to give each replica a --replica-id (the single-server layout, audit.log, is unchanged).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import blindinfer
from blindinfer.cli.demo_model import demo_input, demo_model
from blindinfer.server.audit import verify_audit_log
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support.onnx_models import mlp_model, model_bytes

from .conftest import policy_for

pytestmark = pytest.mark.e2e


def _connect(server: ServerProcess) -> blindinfer.Client:
    policy = policy_for(ServerConfig(simulation=True, limits=Limits(workers=1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(server.url, policy=policy, simulation=True)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "shared-store"


@pytest.fixture
def pair(store: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    logs = [(tmp_path / f"{name}.log").open("w") for name in ("a", "b")]
    servers = [
        start_server(
            ["--simulation", "--workers=1", "--store-dir", str(store), "--replica-id", name],
            stderr=log,
        )
        for name, log in zip(("a", "b"), logs, strict=True)
    ]
    try:
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()
        for log in logs:
            log.close()
        for name in ("a", "b"):
            assert "Traceback" not in (tmp_path / f"{name}.log").read_text()


def test_upload_on_one_replica_runs_on_the_other_and_a_delete_reaches_both(
    pair: tuple[ServerProcess, ServerProcess], store: Path
) -> None:
    a, b = pair
    feed = demo_input()
    with _connect(a) as client_a, _connect(b) as client_b:
        info = client_a.upload_model(demo_model(), name="shared-demo")
        on_a = client_a.run_model("shared-demo", feed)
        on_b = client_b.run_model("shared-demo", feed)  # B started before the upload
        assert on_a.keys() == on_b.keys()
        for name in on_a:
            np.testing.assert_array_equal(on_a[name], on_b[name])
        assert [m.model_id for m in client_b.list_models()] == [info.model_id]

        client_b.delete_model("shared-demo")
        with pytest.raises(blindinfer.ServerError) as caught:
            client_a.run_model("shared-demo", feed)
        assert (caught.value.status, caught.value.code) == (404, "unknown_model")
        with pytest.raises(blindinfer.ServerError) as caught:
            client_a.run_model(info.model_id, feed)
        assert (caught.value.status, caught.value.code) == (404, "unknown_model")
        assert client_a.list_models() == []
    # one chain per replica, each intact; no audit.log of a single server
    assert not (store / "audit.log").exists()
    for name in ("a", "b"):
        assert verify_audit_log(store / f"audit-{name}.log").intact


def test_one_name_through_both_replicas_is_taken_once(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with _connect(a) as client_a, _connect(b) as client_b:
        client_a.upload_model(demo_model(), name="taken")
        other = model_bytes(mlp_model(in_features=8, hidden=16, out_features=3, seed=1))
        with pytest.raises(blindinfer.ServerError) as caught:
            client_b.upload_model(other, name="taken")  # B never listed the models
        assert (caught.value.status, caught.value.code) == (409, "model_name_conflict")


def test_a_second_server_without_a_replica_id_does_not_start(store: Path, tmp_path: Path) -> None:
    with (tmp_path / "first.log").open("w") as log:
        first = start_server(["--simulation", "--workers=1", "--store-dir", str(store)], stderr=log)
        try:
            command = [
                *(sys.executable, "-m", "blindinfer.cli.main", "serve", "--port", "0"),
                *("--simulation", "--workers=1", "--store-dir", str(store)),
            ]
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=60, check=False
            )
        finally:
            first.stop()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("SIMULATION")]
    assert lines == [
        f"blindinfer serve: AuditLogInUseError: audit log {store / 'audit.log'} is in use by "
        "another process: another server uses this --store-dir; give each replica sharing "
        "it its own --replica-id"
    ]
