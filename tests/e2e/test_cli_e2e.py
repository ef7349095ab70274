"""The `blindinfer` command line against a real server, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blindinfer.server.config import ServerConfig
from blindinfer.server.platforms import simulated_mrenclave
from blindinfer.server.process import ServerProcess
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER
from support import onnx_models as zoo

pytestmark = pytest.mark.e2e


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_measure_prints_what_the_server_reports() -> None:
    out = cli("measure", "--simulation").stdout.splitlines()
    assert out[0] == f"mrenclave = {simulated_mrenclave(ServerConfig(simulation=True)).hex()}"
    assert out[1].startswith(f"mrsigner  = {SIMULATION_MRSIGNER.hex()}")
    other = cli("measure", "--simulation", "--max-models", "7").stdout.splitlines()[0]
    assert other != out[0]


def test_policy_discovery_then_attest_with_it(server: ServerProcess, tmp_path: Path) -> None:
    refused = cli("policy", "--from", server.url, check=False)
    assert refused.returncode == 1
    assert "SIMULATION server" in refused.stderr and "--simulation" in refused.stderr
    suggested = cli("policy", "--from", server.url, "--simulation")
    text = suggested.stdout
    assert "WARNING: SIMULATION server" in text
    # Only pins: nothing weaker than the defaults, no all-zero register (issue 21, item 18).
    active = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert 'tcb_statuses = ["UpToDate"]' in active and "accepted_advisories = []" in active
    assert not any("OutOfDate" in line or "INTEL-SA" in line for line in active)
    assert not any(f'"{"0" * 64}"' in line for line in active)
    assert "blindinfer policy: WARNING" not in suggested.stderr  # nothing was left out
    mrenclave = simulated_mrenclave(ServerConfig(simulation=True)).hex()
    assert f'mrenclave = ["{mrenclave}"]' in text
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    report = json.loads(
        cli("attest", server.url, "--policy", str(policy), "--simulation", "--json").stdout
    )
    assert report["claims"]["mrenclave"] == mrenclave
    assert report["tcb_status"] == "UpToDate"
    assert report["simulation"] is True and report["policy_applied"] is True
    human = cli("attest", server.url, "--policy", str(policy), "--simulation")
    assert "SIMULATION" in human.stdout and "policy        satisfied" in human.stdout
    assert "SIMULATION MODE" in human.stderr


def test_upload_run_models_delete(server: ServerProcess, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(cli("policy", "--from", server.url, "--simulation").stdout)
    common = ["--url", server.url, "--policy", str(policy), "--simulation"]
    model = tmp_path / "mlp.onnx"
    model.write_bytes(zoo.model_bytes(zoo.mlp_model(in_features=4, hidden=8, out_features=2)))
    uploaded = json.loads(cli("upload", str(model), "--name", "cli-mlp", *common).stdout)
    assert uploaded["name"] == "cli-mlp" and len(uploaded["sha256"]) == 64
    listing = cli("models", *common).stdout
    assert uploaded["model_id"] in listing and "cli-mlp" in listing
    inputs = tmp_path / "inputs.npz"
    x = np.ones((3, 4), np.float32)
    np.savez(inputs, x=x)
    outputs = tmp_path / "outputs.npz"
    cli("run", "cli-mlp", str(inputs), "--output", str(outputs), *common)
    with np.load(outputs) as got:
        assert got["probabilities"].shape == (3, 2)
        np.testing.assert_allclose(got["probabilities"].sum(axis=1), 1.0, rtol=1e-6)
    deleted = json.loads(cli("delete", "cli-mlp", *common).stdout)
    assert deleted == {"deleted": uploaded["model_id"], "name": "cli-mlp"}
    assert "cli-mlp" not in cli("models", *common).stdout


def test_demo_runs_the_whole_flow() -> None:
    result = cli("demo")
    assert "attestation verified" in result.stdout
    assert "bit-identical to onnxruntime in-process: True" in result.stdout
    assert "models left: 0" in result.stdout
    assert "server stopped" in result.stdout


def test_serve_refuses_to_start_without_a_platform() -> None:
    result = cli("serve", "--port", "0", check=False)
    assert result.returncode == 2
    assert "no TEE platform" in result.stderr and "--simulation" in result.stderr
