"""The simulation TEE: its evidence verifies with unmodified dcap-qvl under the simulation
root only, any tampering is caught, and its PKI is the one the client pins."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import dcap_qvl  # type: ignore[import-untyped]  # has a .pyi but no py.typed marker
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindinfer.attestation.intel.dcap import DcapVerdict, verify_dcap
from blindinfer.attestation.intel.sgx_quote import parse_sgx_quote
from blindinfer.attestation.roots import (
    INTEL_SGX_ROOT,
    SIMULATION_ROOT,
    TrustRoot,
    root_for_der,
)
from blindinfer.errors import QuoteVerificationError
from blindinfer.tee.platform import Platform
from blindinfer.tee.simulation import pki
from blindinfer.tee.simulation.platform import (
    SIMULATION_MRSIGNER,
    SIMULATION_SEALING_SECRET,
    SimulationPlatform,
)

PROJECT = Path(__file__).resolve().parents[2]
MRENCLAVE = hashlib.sha256(b"test enclave").digest()
REPORT_DATA = hashlib.sha512(b"tls key and nonce").digest()
NOW = 1_800_000_000  # fixed clock: 2027-01-15


class Clock:
    """An injectable clock the tests move by hand."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def platform() -> SimulationPlatform:
    return SimulationPlatform(MRENCLAVE, isvprodid=3, isvsvn=2, clock=Clock(NOW))


@pytest.fixture(scope="module")
def evidence(platform: SimulationPlatform) -> tuple[bytes, str]:
    ev = platform.evidence(REPORT_DATA)
    assert ev.kind == "intel-sgx"
    return ev.quote, ev.collateral_json


def _verify(quote: bytes, collateral: str, *, now: int = NOW) -> DcapVerdict:
    return verify_dcap(quote, collateral, root=SIMULATION_ROOT, now=now)


def test_is_a_platform(platform: SimulationPlatform) -> None:
    p: Platform = platform  # checked by mypy against the protocol
    assert p.kind == "simulation"


def test_simulation_evidence_verifies_under_the_simulation_root(
    evidence: tuple[bytes, str],
) -> None:
    assert _verify(*evidence) == DcapVerdict(status="UpToDate", advisory_ids=())


def test_simulation_evidence_is_refused_under_intel_root(evidence: tuple[bytes, str]) -> None:
    with pytest.raises(QuoteVerificationError, match="Intel SGX Root CA"):
        verify_dcap(*evidence, root=INTEL_SGX_ROOT, now=NOW)


def test_report_body_carries_what_the_platform_was_given(evidence: tuple[bytes, str]) -> None:
    body = parse_sgx_quote(evidence[0]).body
    assert body.report_data == REPORT_DATA
    assert body.mrenclave == MRENCLAVE
    assert body.mrsigner == SIMULATION_MRSIGNER
    assert (body.isvprodid, body.isvsvn) == (3, 2)
    assert (body.flags, body.xfrm, body.debug) == (0x05, 0x03, False)
    assert body.cpusvn == pki.SIM_CPUSVN


def test_mrsigner_is_the_hash_of_the_shipped_signer_key() -> None:
    public = pki.load_key("enclave_signer").public_key()
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert hashlib.sha256(point[1:]).digest() == SIMULATION_MRSIGNER


def _cert_data_offset(quote: bytes) -> int:
    return len(quote) - len(parse_sgx_quote(quote).signature.cert_data)


@pytest.mark.parametrize(
    ("region", "offset", "reason"),
    [
        ("header user_data", 28, "ISV enclave report signature is invalid"),
        ("report body mrenclave", 48 + 64, "ISV enclave report signature is invalid"),
        ("report body report_data", 48 + 320, "ISV enclave report signature is invalid"),
        ("quote signature", 436, "ISV enclave report signature is invalid"),
        ("attestation key", 436 + 64, "QE report hash mismatch"),
        ("QE report", 436 + 128 + 64, "Signature is invalid for qe_report in quote"),
        ("QE report signature", 436 + 512, "Signature is invalid for qe_report in quote"),
        ("QE auth data", 436 + 576 + 2, "QE report hash mismatch"),
    ],
)
def test_tampering_with_the_quote_is_caught(
    evidence: tuple[bytes, str], region: str, offset: int, reason: str
) -> None:
    quote, collateral = evidence
    tampered = bytearray(quote)
    tampered[offset] ^= 0x01
    with pytest.raises(QuoteVerificationError, match=reason):
        _verify(bytes(tampered), collateral)


@pytest.mark.parametrize("cert_offset", [700, 1400])  # inside the PCK leaf / PCK CA
def test_tampering_with_the_cert_chain_is_caught(
    evidence: tuple[bytes, str], cert_offset: int
) -> None:
    quote, collateral = evidence
    offset = _cert_data_offset(quote) + cert_offset
    tampered = bytearray(quote)
    tampered[offset] = ord("A") if quote[offset] != ord("A") else ord("B")  # still base64
    with pytest.raises(QuoteVerificationError, match="Failed to verify certificate chain"):
        _verify(bytes(tampered), collateral)


def test_tampering_with_the_tcb_info_is_caught(evidence: tuple[bytes, str]) -> None:
    quote, collateral = evidence
    doc = json.loads(collateral)
    weakened = doc["tcb_info"].replace('"pcesvn":13', '"pcesvn":12')
    assert weakened != doc["tcb_info"]
    doc["tcb_info"] = weakened
    with pytest.raises(QuoteVerificationError, match="Signature is invalid for tcb_info"):
        _verify(quote, json.dumps(doc))


def test_collateral_expires(evidence: tuple[bytes, str]) -> None:
    with pytest.raises(QuoteVerificationError, match=r"(?i)expired"):
        _verify(*evidence, now=NOW + 31 * 86400)


def test_collateral_is_not_valid_before_it_was_issued(evidence: tuple[bytes, str]) -> None:
    with pytest.raises(QuoteVerificationError, match="TCBInfo issue date is in the future"):
        _verify(*evidence, now=NOW - 2 * 3600)


def test_debug_enclave_is_refused() -> None:
    platform = SimulationPlatform(MRENCLAVE, debug=True, clock=Clock(NOW))
    ev = platform.evidence(REPORT_DATA)
    body = parse_sgx_quote(ev.quote).body
    assert (body.flags, body.debug) == (0x07, True)
    with pytest.raises(QuoteVerificationError, match="Debug mode is enabled"):
        _verify(ev.quote, ev.collateral_json)


def test_collateral_is_cached_and_rebuilt_a_day_before_next_update() -> None:
    clock = Clock(NOW)
    platform = SimulationPlatform(MRENCLAVE, clock=clock)
    first = platform.evidence(REPORT_DATA).collateral_json
    clock.t = NOW + 28 * 86400
    assert platform.evidence(REPORT_DATA).collateral_json == first
    clock.t = NOW + 29 * 86400 + 1
    ev = platform.evidence(REPORT_DATA)
    assert ev.collateral_json != first
    assert _verify(ev.quote, ev.collateral_json, now=int(clock.t)).status == "UpToDate"
    clock.t = NOW  # a clock moving back before the issue date also forces a rebuild
    ev = platform.evidence(REPORT_DATA)
    assert _verify(ev.quote, ev.collateral_json, now=NOW).status == "UpToDate"


@pytest.mark.parametrize("bad", [b"", bytes(63), bytes(65), "x" * 64])
def test_report_data_must_be_64_bytes(platform: SimulationPlatform, bad: object) -> None:
    with pytest.raises(ValueError, match="exactly 64 bytes"):
        platform.evidence(bad)  # type: ignore[arg-type]


def test_mrenclave_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="mrenclave must be 32 bytes"):
        SimulationPlatform(bytes(31))


def test_each_platform_has_its_own_attestation_key() -> None:
    a = parse_sgx_quote(SimulationPlatform(MRENCLAVE).evidence(REPORT_DATA).quote)
    b = parse_sgx_quote(SimulationPlatform(MRENCLAVE).evidence(REPORT_DATA).quote)
    assert a.signature.attestation_key != b.signature.attestation_key


def test_sealing_key_is_deterministic_per_identity() -> None:
    key = SimulationPlatform(MRENCLAVE).sealing_key()
    expected = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"blindinfer-seal" + MRENCLAVE + SIMULATION_MRSIGNER,
    ).derive(SIMULATION_SEALING_SECRET)
    assert key == expected
    assert SimulationPlatform(MRENCLAVE).sealing_key() == key
    assert SimulationPlatform(bytes(32)).sealing_key() != key


def test_pinned_simulation_root_is_the_one_built_from_the_shipped_key() -> None:
    built = pki.build_root_certificate(pki.load_key("root_ca"))
    assert built.public_bytes(serialization.Encoding.DER) == SIMULATION_ROOT.der
    assert pki.simulation_pki().root.public_bytes(serialization.Encoding.DER) == SIMULATION_ROOT.der
    assert SIMULATION_ROOT.simulation is True
    assert INTEL_SGX_ROOT.simulation is False
    assert INTEL_SGX_ROOT.sha256 == (
        "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
    )


def test_shipped_keys_are_reproduced_by_the_generator() -> None:
    spec = importlib.util.spec_from_file_location(
        "make_simulation_pki", PROJECT / "tools" / "make_simulation_pki.py"
    )
    assert spec is not None
    assert spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name in pki.KEY_NAMES:
        assert tool.derive_key(name).private_numbers() == pki.load_key(name).private_numbers()


def test_root_for_der_matches_only_pinned_roots() -> None:
    assert root_for_der(SIMULATION_ROOT.der) is SIMULATION_ROOT
    assert root_for_der(INTEL_SGX_ROOT.der) is INTEL_SGX_ROOT
    pck_ca_der = pki.simulation_pki().pck_ca.public_bytes(serialization.Encoding.DER)
    assert root_for_der(pck_ca_der) is None


def test_unpinned_root_is_refused(evidence: tuple[bytes, str]) -> None:
    pck_ca_der = pki.simulation_pki().pck_ca.public_bytes(serialization.Encoding.DER)
    impostor = TrustRoot(name="impostor", der=pck_ca_der, simulation=True)
    with pytest.raises(QuoteVerificationError, match="not a pinned root"):
        verify_dcap(*evidence, root=impostor, now=NOW)


def test_oversized_or_malformed_collateral_is_refused(evidence: tuple[bytes, str]) -> None:
    quote, collateral = evidence
    with pytest.raises(QuoteVerificationError, match="at most 262144 characters"):
        _verify(quote, collateral + " " * 256 * 1024)
    with pytest.raises(QuoteVerificationError, match="malformed collateral: not JSON"):
        _verify(quote, "{")
    with pytest.raises(QuoteVerificationError, match=r"missing fields \['pck_crl'"):
        _verify(quote, "{}")


def test_collateral_may_not_replace_the_quotes_pck_chain(evidence: tuple[bytes, str]) -> None:
    """dcap-qvl would verify a collateral-supplied PCK chain instead of the quote's."""
    quote, collateral = evidence
    doc = json.loads(collateral)
    doc["pck_certificate_chain"] = pki.simulation_pki().pck_chain_pem.decode()
    with pytest.raises(QuoteVerificationError, match="unexpected fields"):
        _verify(quote, json.dumps(doc))


def test_every_certificate_says_simulation() -> None:
    p = pki.simulation_pki()
    for cert in (p.root, p.pck_ca, p.tcb_signing, p.pck_leaf):
        assert "SIMULATION" in cert.subject.rfc4514_string()
    assert p.root.not_valid_before_utc.year == 2025
    assert p.root.not_valid_after_utc.year == 2049


def test_pck_leaf_carries_the_intel_sgx_extension() -> None:
    ext = dcap_qvl.parse_pck_extension_from_pem(pki.simulation_pki().pck_chain_pem)
    assert ext.ppid == pki.SIM_PPID
    assert ext.cpu_svn == pki.SIM_CPUSVN
    assert ext.pce_svn == pki.SIM_PCESVN
    assert ext.pce_id == pki.SIM_PCEID
    assert ext.fmspc == pki.SIM_FMSPC
    assert ext.sgx_type == 0
    assert ext.get_value("1.2.840.113741.1.13.1.2.17") == bytes([pki.SIM_PCESVN])


def test_collateral_round_trips_through_dcap_qvl(evidence: tuple[bytes, str]) -> None:
    parsed = dcap_qvl.QuoteCollateralV3.from_json(evidence[1])
    tcb = json.loads(parsed.tcb_info)
    assert (tcb["id"], tcb["version"], tcb["fmspc"]) == ("SGX", 3, "53494D000000")
    assert tcb["issueDate"] == "2027-01-15T07:00:00Z"
    assert tcb["nextUpdate"] == "2027-02-14T08:00:00Z"
    qe = json.loads(parsed.qe_identity)
    assert qe["mrsigner"] == pki.SIM_QE_MRSIGNER.hex().upper()
    assert len(parsed.tcb_info_signature) == 64


def test_evidence_is_cheap(platform: SimulationPlatform) -> None:
    """Well under 2 ms per call (about 0.1 ms measured); best of 5 batches resists noise."""
    platform.evidence(REPORT_DATA)
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            platform.evidence(REPORT_DATA)
        batches.append((time.perf_counter() - start) / 20)
    assert min(batches) < 0.002


def test_deeply_nested_collateral_is_a_verification_error(evidence: tuple[bytes, str]) -> None:
    with pytest.raises(QuoteVerificationError, match="not JSON"):
        _verify(evidence[0], "[" * 100_000)
