"""`blindinfer verify` offline, on the real vectors and on bundles saved from a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blindinfer.server.process import ServerProcess
from support import vectors

pytestmark = pytest.mark.e2e


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("case", vectors.case_params("intel-dcap"))
def test_intel_vectors_reach_their_expected_outcome(case: dict[str, Any]) -> None:
    quote = vectors.path(case, "evidence")
    if case.get("evidence_encoding") == "hex":
        pytest.skip("hex-encoded quotes are covered by the unit tests")
    result = cli(
        "verify",
        "--intel-quote",
        str(quote),
        "--collateral",
        str(vectors.path(case, "collateral")),
        "--at",
        str(case["verify_at_unix"]),
        "--json",
    )
    document = json.loads(result.stdout)
    if case["expect"] == "ok":
        assert result.returncode == 0, result.stdout + result.stderr
        assert document["authentic"] is True
        assert document["tcb_status"] == case["tcb_status"]
        assert document["advisory_ids"] == case["advisory_ids"]
        assert document["policy_applied"] is False
    else:
        assert result.returncode == 1
        assert document["authentic"] is False
        assert case["error_mentions"].lower() in document["reason"].lower()


def test_at_accepts_iso_8601() -> None:
    case = vectors.case("tdx_v4_phala")
    args = [
        "verify",
        "--intel-quote",
        str(vectors.path(case, "evidence")),
        "--collateral",
        str(vectors.path(case, "collateral")),
        "--json",
    ]
    assert cli(*args, "--at", "2025-07-19T10:00:34Z").returncode == 0
    late = cli(*args, "--at", "2025-09-17T10:00:34Z")
    assert late.returncode == 1
    assert "expired" in json.loads(late.stdout)["reason"].lower()


def test_bundle_saved_from_a_server_verifies_offline(server: ServerProcess, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.json"
    policy = tmp_path / "policy.toml"
    policy.write_text(cli("policy", "--from", server.url, "--simulation").stdout)
    saved = cli(
        "attest", server.url, "--policy", str(policy), "--simulation", "--save", str(bundle)
    )
    assert saved.returncode == 0, saved.stderr
    ok = cli("verify", str(bundle), "--policy", str(policy), "--simulation", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["bound_to_tls_key"] is True and report["kind"] == "intel-sgx"
    assert report["claims"]["mrenclave"] in policy.read_text()
    # without --simulation the same bundle is refused
    refused = cli("verify", str(bundle), "--policy", str(policy))
    assert refused.returncode == 1 and "SimulationNotAllowedError" in refused.stdout
    # a policy the server does not satisfy: exit 3, with the diff
    strict = tmp_path / "strict.toml"
    strict.write_text(policy.read_text().replace("min_isvsvn = 1", "min_isvsvn = 5"))
    mismatch = cli("verify", str(bundle), "--policy", str(strict), "--simulation")
    assert mismatch.returncode == 3
    assert "isvsvn: expected >= 5, got 1" in mismatch.stdout
    # a tampered bundle: the nonce no longer matches
    document = json.loads(bundle.read_text())
    document["nonce"] = "00" * 32
    bundle.write_text(json.dumps(document))
    stale = cli("verify", str(bundle), "--policy", str(policy), "--simulation")
    assert stale.returncode == 1 and "FreshnessError" in stale.stdout
    # outside the collateral window (60 days after capture) the evidence is refused
    fresh = tmp_path / "fresh.json"
    assert cli("attest", server.url, "--simulation", "--save", str(fresh)).returncode == 0
    later = str(json.loads(fresh.read_text())["captured_at"] + 60 * 86400)
    expired = cli("verify", str(fresh), "--simulation", "--at", later)
    assert expired.returncode == 1 and "expired" in expired.stdout.lower()


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
@pytest.mark.parametrize("case", vectors.case_params("amd-sev-snp"))
def test_snp_vectors_reach_their_expected_outcome(case: dict[str, Any], tmp_path: Path) -> None:
    args = [
        "verify",
        "--snp-report",
        str(vectors.path(case, "evidence")),
        "--vcek",
        str(vectors.path(case, "chip_cert")),
        "--ask-ark",
        str(vectors.path(case, "ask_ark_chain")),
        "--at",
        case["verify_at"],
        "--json",
    ]
    result = cli(*args)
    document = json.loads(result.stdout)
    if case["expect"] == "err":
        assert result.returncode == 1
        assert document["authentic"] is False
        return
    assert result.returncode == 0, result.stdout + result.stderr
    assert document["kind"] == "amd-snp" and document["root"] == "AMD ARK (Milan)"
    claims = document["claims"]
    # a production policy pinning this very measurement: the debug guest is still refused
    policy = tmp_path / "policy.toml"
    pinned = f'[snp]\nmeasurement = ["{claims["measurement"]}"]\nvmpl = [{claims["vmpl"]}]\n'
    policy.write_text(pinned)
    # by default: no AMD CRL came with these files, and their 2022-era TCB is below the floor
    refused = cli(*args, "--policy", str(policy))
    fields = [m["field"] for m in json.loads(refused.stdout)["mismatches"]]
    assert refused.returncode == 3
    assert {"snp.allow_missing_crl", "snp.min_reported_tcb.microcode"} <= set(fields)
    # accepted only when the policy lowers the floor to their TCB and allows a missing CRL
    tcb = dict(part.split("=") for part in claims["reported_tcb"].split())
    floor = ", ".join(f"{k} = {v}" for k, v in tcb.items())
    policy.write_text(pinned + f"allow_missing_crl = true\nmin_reported_tcb = {{ {floor} }}\n")
    with_policy = cli(*args, "--policy", str(policy))
    fields = [m["field"] for m in json.loads(with_policy.stdout)["mismatches"]]
    if claims["debug"]:
        assert with_policy.returncode == 3 and fields == ["snp.allow_debug"]
    else:
        assert with_policy.returncode == 0 and fields == []


@pytest.mark.parametrize("case", vectors.case_params("nvidia-gpu-spdm"))
def test_nvidia_vector_verifies_with_its_nonce(case: dict[str, Any]) -> None:
    args = [
        "verify",
        "--nvidia-report",
        str(vectors.path(case, "evidence")),
        "--nvidia-certs",
        str(vectors.path(case, "cert_chain")),
        "--at",
        "2025-01-01T00:00:00Z",
        "--json",
    ]
    ok = cli(*args, "--nonce", case["expected_nonce_hex"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    document = json.loads(ok.stdout)
    assert document["kind"] == "nvidia-h100" and len(document["claims"]) == 64
    wrong = cli(*args, "--nonce", "00" * 32)
    assert wrong.returncode == 1
    assert "nonce" in json.loads(wrong.stdout)["reason"].lower()


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_snp_crl_not_signed_by_the_ark_is_not_authentic(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.serialization import Encoding

    from blindinfer.attestation.roots.amd import AMD_PRODUCTS

    case = vectors.case("snp_milan_trustee")
    ark = x509.load_der_x509_certificate(AMD_PRODUCTS["Milan"].ark_der)
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ark.subject)
        .last_update(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        .next_update(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
        .sign(
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            hashes.SHA384(),
            rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
        )
    )
    (tmp_path / "amd.crl").write_bytes(forged.public_bytes(Encoding.PEM))
    result = cli(
        "verify",
        "--snp-report",
        str(vectors.path(case, "evidence")),
        "--vcek",
        str(vectors.path(case, "chip_cert")),
        "--snp-crl",
        str(tmp_path / "amd.crl"),
        "--at",
        case["verify_at"],
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "CRL is not signed by the ARK" in result.stdout + result.stderr
