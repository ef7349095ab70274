"""The demo's closing summary: what was verified, and what simulation cannot prove."""

from __future__ import annotations

from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.cli.demo import summary


def _report() -> VerifiedAttestation:
    return VerifiedAttestation(
        kind="intel-sgx",
        root="Blindinfer SIMULATION SGX Root CA",
        simulation=True,
        tcb_status="UpToDate",
        advisory_ids=(),
        claims={"mrenclave": "ab" * 32},
        report_data=bytes(64),
        certificate_der=b"",
        nonce=bytes(32),
        verified_at=0,
    )


def test_summary_names_every_check_and_every_limit() -> None:
    text = "\n".join(summary(_report(), bit_exact=True, deleted=True))
    assert "pinned root: Blindinfer SIMULATION SGX Root CA" in text
    assert "TLS certificate's key" in text
    assert "fresh nonce" in text
    assert "measurement equals the policy: mrenclave abababababababab" in text
    assert "bit-exact with onnxruntime in-process: yes" in text
    assert "model was deleted from the server: yes" in text
    assert "NOT proven" in text
    assert "no TEE" in text and "operator can read its memory" in text
    assert "not Intel's" in text
    assert "TEE hardware" in text and "measured build" in text


def test_summary_is_short() -> None:
    lines = summary(_report(), bit_exact=True, deleted=True)
    assert 8 <= len(lines) <= 14
    assert all(len(line) <= 100 for line in lines)


def test_summary_says_no_when_a_result_check_failed() -> None:
    text = "\n".join(summary(_report(), bit_exact=False, deleted=False))
    assert "bit-exact with onnxruntime in-process: NO" in text
    assert "deleted from the server: NO" in text
