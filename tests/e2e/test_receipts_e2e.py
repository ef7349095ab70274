"""Receipts from a real server, verified offline by the CLI after the server is gone."""

from __future__ import annotations

import base64
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

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


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

    # other spellings of the same valid receipt (issue 21, item 19): junk characters and
    # padding in the base64url, the high-S twin of the signature, a non-ASCII kid
    jws = proof["receipt"]
    sig = base64.urlsafe_b64decode(jws["signature"] + "==")
    s = int.from_bytes(sig[32:], "big")
    high_s = sig[:32] + (P256_N - s).to_bytes(32, "big")
    kid_header = base64.urlsafe_b64encode(
        json.dumps({"alg": "ES256", "kid": "é" * 64, "typ": "blindinfer-receipt+jwt"}).encode()
    )
    spellings = {
        "junk": {**jws, "payload": jws["payload"][:8] + "!*" + jws["payload"][8:]},
        "padding": {**jws, "signature": jws["signature"] + "=="},
        "high-s": {**jws, "signature": base64.urlsafe_b64encode(high_s).rstrip(b"=").decode()},
        "kid": {**jws, "protected": kid_header.rstrip(b"=").decode()},
    }
    for name, spelled in spellings.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**proof, "receipt": spelled}))
        refused = cli(*base, str(tmp_path / f"{name}.json"))
        assert refused.returncode == 1, (name, refused.stdout, refused.stderr)
        assert refused.stdout.startswith("REFUSED") and "Traceback" not in refused.stderr
        with pytest.raises(ProtocolError):
            verify_proof(load_proof(tmp_path / f"{name}.json"), policy=policy, simulation=True)


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


def test_receipts_on_both_sides_of_the_thread_threshold() -> None:
    """Small tensors are receipted on the event loop, large ones on a thread (with the
    encoding, server/respond.py OFF_LOOP_BYTES): both verify, digests recomputed by the
    client, the first receipt of a fresh server (boot evidence made off the loop) included."""
    from blindinfer.server.respond import OFF_LOOP_BYTES
    from support.onnx_models import dtype_identity_feed, dtype_identity_model

    policy = policy_for(ServerConfig(simulation=True))
    small = dtype_identity_feed(rows=3, cols=5)
    large = dtype_identity_feed(rows=512, cols=128)
    assert sum(a.nbytes for a in small.values()) * 3 < OFF_LOOP_BYTES
    assert sum(a.nbytes for a in large.values()) > OFF_LOOP_BYTES
    with start_server(["--simulation"]) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(server.url, policy=policy, simulation=True)
        with client:
            sha = client.upload_model(model_bytes(dtype_identity_model())).sha256
            for feed in (small, large, small):
                outputs = client.run_model(sha, feed, receipt=True)  # verified on return
                assert isinstance(outputs, ReceiptedOutputs)
                for name, array in feed.items():
                    np.testing.assert_array_equal(outputs[name.replace("in_", "out_")], array)
