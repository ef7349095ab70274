"""Receipts from a real server, verified offline by the CLI after the server is gone."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import blindinfer
from blindinfer.client.receipts import ReceiptedOutputs, load_proof, verify_proof
from blindinfer.errors import ProtocolError
from blindinfer.server.config import ServerConfig
from blindinfer.server.process import start_server
from support.onnx_models import model_bytes, multi_io_feed, multi_io_model

from .conftest import policy_for

pytestmark = pytest.mark.e2e


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_receipts_verify_offline_after_the_server_is_gone(tmp_path: Path) -> None:
    policy = policy_for(ServerConfig(simulation=True))
    policy_file = tmp_path / "policy.toml"
    feed = multi_io_feed()
    with start_server(["--simulation"]) as server:
        policy_file.write_text(cli("policy", "--from", server.url, "--simulation").stdout)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(server.url, policy=policy, simulation=True)
        with client:
            uploaded = client.upload_model(model_bytes(multi_io_model()), receipt=True)
            assert uploaded.receipt is not None
            assert uploaded.receipt.payload["kind"] == "upload"
            assert uploaded.receipt.payload["model"]["sha256"] == uploaded.sha256
            outputs = client.run_model(uploaded.sha256, feed, receipt=True)
            assert isinstance(outputs, ReceiptedOutputs)
            payload = outputs.receipt.payload
            assert payload["model"] == {"sha256": uploaded.sha256, "model_id": uploaded.model_id}
            assert payload["measurement"] == client.attestation.mrenclave.hex()
            outputs.receipt.save(tmp_path / "proof.json")
            plain = client.run_model(uploaded.sha256, feed)
            assert not isinstance(plain, ReceiptedOutputs)
            deleted = client.delete_model(uploaded.model_id, receipt=True)
            assert deleted.receipt is not None
            assert deleted.receipt.payload["destroyed"] == ["model", "sealed_copies"]
            deleted.receipt.save(tmp_path / "delete.json")
            uploaded.receipt.save(tmp_path / "upload.json")
    np.savez(tmp_path / "inputs.npz", **feed)  # type: ignore[arg-type]
    np.savez(tmp_path / "outputs.npz", **dict(outputs))  # type: ignore[arg-type]
    base = ("verify-receipt", "--policy", str(policy_file), "--simulation")

    ok = cli(*base, str(tmp_path / "proof.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "VALID" in ok.stdout
    tensors = ("--inputs", str(tmp_path / "inputs.npz"), "--outputs", str(tmp_path / "outputs.npz"))
    ok = cli(*base, str(tmp_path / "proof.json"), *tensors)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for name in ("upload.json", "delete.json"):
        assert cli(*base, str(tmp_path / name)).returncode == 0

    # other tensors, no simulation root, tampered proofs: refused with a reason
    np.savez(tmp_path / "other.npz", **{k: v + 1 for k, v in feed.items()})  # type: ignore[arg-type]
    wrong = cli(*base, str(tmp_path / "proof.json"), "--inputs", str(tmp_path / "other.npz"))
    assert wrong.returncode == 1 and "inputs_digest" in wrong.stdout
    assert (
        cli("verify-receipt", "--policy", str(policy_file), str(tmp_path / "proof.json")).returncode
        == 1
    )

    proof = json.loads((tmp_path / "proof.json").read_text())
    swapped = {**proof, "receipt": json.loads((tmp_path / "upload.json").read_text())["receipt"]}
    swapped["receipt"] = {**proof["receipt"], "payload": swapped["receipt"]["payload"]}
    (tmp_path / "tampered.json").write_text(json.dumps(swapped))
    refused = cli(*base, str(tmp_path / "tampered.json"))
    assert refused.returncode == 1 and "REFUSED" in refused.stdout


def test_a_proof_with_another_servers_evidence_is_refused(tmp_path: Path) -> None:
    """A receipt signed by a key the evidence does not bind (another server's)."""
    policy = policy_for(ServerConfig(simulation=True))
    proofs = []
    for index in range(2):
        with start_server(["--simulation"]) as server:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", blindinfer.SimulationWarning)
                client = blindinfer.connect(server.url, policy=policy, simulation=True)
            with client:
                info = client.upload_model(model_bytes(multi_io_model()), receipt=True)
                assert info.receipt is not None
                info.receipt.save(tmp_path / f"{index}.json")
                proofs.append(load_proof(tmp_path / f"{index}.json"))
    verify_proof(proofs[0], policy=policy, simulation=True)
    mixed = {**proofs[1], "receipt": proofs[0]["receipt"]}
    with pytest.raises(ProtocolError, match="another key"):
        verify_proof(mixed, policy=policy, simulation=True)
    time_forged = json.loads(json.dumps(proofs[0]))
    time_forged["boot_evidence"] = proofs[1]["boot_evidence"]
    with pytest.raises(blindinfer.BlindInferError):
        verify_proof(time_forged, policy=policy, simulation=True)
