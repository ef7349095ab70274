"""NVIDIA H100 GPU evidence: parser, verifier and `[gpu]` policy, against a real report
that this project did not make (the shared vectors' nvidia-gpu-spdm case), plus
certificates and reports forged here to show what must be refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.attestation.nvidia import verify as nvidia_module
from blindinfer.attestation.nvidia.policy import NvidiaGpuPolicy
from blindinfer.attestation.nvidia.spdm import (
    MeasurementBlock,
    NvidiaGpuReport,
    OpaqueData,
    OpaqueField,
    SpdmMeasurementRequest,
    SpdmMeasurementResponse,
    decode_report_hex,
    parse_nvidia_report,
)
from blindinfer.attestation.nvidia.verify import (
    GpuNonceMismatchError,
    GpuVerified,
    verify_nvidia_gpu,
)
from blindinfer.attestation.roots import TrustRoot
from blindinfer.attestation.roots.nvidia import NVIDIA_DEVICE_ROOT, NVIDIA_DEVICE_ROOT_SHA256
from blindinfer.errors import (
    FreshnessError,
    Mismatch,
    PolicyError,
    QuoteParseError,
    QuoteVerificationError,
)
from support import vectors
from support.vectors import VECTORS

CASE_ID = "nvidia_h100_trustee_case1"

VERIFY_AT = datetime(2025, 1, 1, tzinfo=UTC)
"""After every notBefore in the chain (the latest is 2022-03-01) and before their
notAfter (9999-12-31): the report carries no time of its own, and driver 550.90.07 (in
its opaque data) is a 2024 release, so 2025-01-01 is a plausible moment of capture."""

EXPECTED_NONCE = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb"
EXPECTED_FWID = (
    "f5c384aebb579217a2c66b17ed0f28e6a9b8d639041acd7b"
    "4721cec004f7275494ba94bb5cdfdb3055ee051762b1f75d"
)
# Block 2's value as trustee's expected claims for this report list it.
EXPECTED_BLOCK_2 = (
    "8048dfd18fe229bf16eb9d30cca0f11a24dafe6eb731de14"
    "62984645a0b189b77c4e4e17de727a5e19e3d07de51da338"
)


def _case() -> dict[str, Any]:
    case = vectors.case(CASE_ID)
    assert case["kind"] == "nvidia-gpu-spdm"
    return case


@pytest.fixture(scope="module")
def vector() -> tuple[bytes, bytes, bytes]:
    """(report bytes, chain PEM, expected nonce) of the real H100 case."""
    case = _case()
    assert case["evidence_encoding"] == "hex"
    report = decode_report_hex((VECTORS / case["evidence"]).read_text())
    chain = (VECTORS / case["cert_chain"]).read_bytes()
    assert case["expected_nonce_hex"] == EXPECTED_NONCE
    return report, chain, bytes.fromhex(case["expected_nonce_hex"])


@pytest.fixture(scope="module")
def verified(vector: tuple[bytes, bytes, bytes]) -> GpuVerified:
    report, chain, nonce = vector
    return verify_nvidia_gpu(report, chain, expected_nonce=nonce, now=VERIFY_AT)


# --- the real report ------------------------------------------------------------------


def test_real_report_verifies(verified: GpuVerified) -> None:
    assert len(verified.report.response.blocks) == 64
    assert sorted(verified.measurements) == list(range(1, 65))
    assert verified.measurements[2].hex() == EXPECTED_BLOCK_2
    assert verified.nonce.hex() == EXPECTED_NONCE
    assert verified.driver_version == "550.90.07"
    assert verified.vbios_version == "96.00.9f.00.01"
    assert verified.fwid is not None and verified.fwid.hex() == EXPECTED_FWID
    assert verified.device_cert.fwid == verified.fwid
    assert verified.device_cert.subject.startswith("CN=GH100 A01 GSP FMC LF,")
    assert verified.device_cert.chain_sha256[-1] == NVIDIA_DEVICE_ROOT_SHA256
    opaque = verified.report.response.opaque
    assert (opaque.project, opaque.project_sku, opaque.chip_sku, opaque.chip_sku_mod) == (
        "1010",
        "0200",
        "882",
        "0",
    )
    assert opaque.measurement_counts[:4] == (0, 1, 4, 1)
    with pytest.raises(TypeError):
        verified.measurements[1] = b""  # type: ignore[index]


def test_real_report_round_trips(vector: tuple[bytes, bytes, bytes]) -> None:
    report = parse_nvidia_report(vector[0])
    assert report.to_bytes() == vector[0]
    assert report.signed_bytes == vector[0][:-96]
    assert NvidiaGpuReport.assemble(report.request, report.response).raw == vector[0]
    assert report.request.signature_requested and report.request.param2 == 0xFF
    assert report.response.nonce != report.request.nonce  # the GPU's own nonce


def test_also_accepts_unix_time(vector: tuple[bytes, bytes, bytes]) -> None:
    report, chain, nonce = vector
    ok = verify_nvidia_gpu(report, chain, expected_nonce=nonce, now=int(VERIFY_AT.timestamp()))
    assert ok.nonce == nonce


def test_pinned_root_is_the_vector_chains_root(vector: tuple[bytes, bytes, bytes]) -> None:
    last = x509.load_pem_x509_certificates(vector[1])[-1]
    der = last.public_bytes(Encoding.DER)
    assert der == NVIDIA_DEVICE_ROOT.der
    assert hashlib.sha256(der).hexdigest() == NVIDIA_DEVICE_ROOT_SHA256
    assert NVIDIA_DEVICE_ROOT_SHA256 == (
        "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
    )


def test_wrong_nonce_is_refused(vector: tuple[bytes, bytes, bytes]) -> None:
    report, chain, nonce = vector
    wrong = bytes([nonce[0] ^ 1]) + nonce[1:]
    with pytest.raises(GpuNonceMismatchError, match="nonce") as info:
        verify_nvidia_gpu(report, chain, expected_nonce=wrong, now=VERIFY_AT)
    assert isinstance(info.value, QuoteVerificationError)
    assert isinstance(info.value, FreshnessError)
    assert EXPECTED_NONCE in str(info.value) and wrong.hex() in str(info.value)


def test_nonce_of_wrong_size_is_a_caller_error(vector: tuple[bytes, bytes, bytes]) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        verify_nvidia_gpu(vector[0], vector[1], expected_nonce=b"short", now=VERIFY_AT)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("what", "offset"),
    [
        ("requester nonce", 4),
        ("measurement value of block 1", 37 + 8 + 7),
        ("responder nonce", -96 - 422 - 2 - 1),
        ("driver version text", -96 - 422 + 70),
        ("signature r", -96),
        ("signature s", -1),
    ],
)
def test_flipped_byte_is_refused(
    vector: tuple[bytes, bytes, bytes], what: str, offset: int
) -> None:
    report, chain, _ = vector
    tampered = _flip(report, offset % len(report))
    parse_nvidia_report(tampered)  # still well-formed: it is the signature that fails
    with pytest.raises(QuoteVerificationError, match="signature is invalid"):
        verify_nvidia_gpu(tampered, chain, expected_nonce=None, now=VERIFY_AT)


def test_outside_validity_is_refused(vector: tuple[bytes, bytes, bytes]) -> None:
    report, chain, nonce = vector
    with pytest.raises(QuoteVerificationError, match="not valid at 2021-06-01"):
        verify_nvidia_gpu(report, chain, expected_nonce=nonce, now=datetime(2021, 6, 1, tzinfo=UTC))


def test_naive_time_is_refused(vector: tuple[bytes, bytes, bytes]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_nvidia_gpu(vector[0], vector[1], expected_nonce=None, now=datetime(2025, 1, 1))


def test_chain_missing_an_intermediate_is_refused(vector: tuple[bytes, bytes, bytes]) -> None:
    certs = x509.load_pem_x509_certificates(vector[1])
    chain = b"".join(c.public_bytes(Encoding.PEM) for c in certs[:1] + certs[2:])
    with pytest.raises(QuoteVerificationError, match="names issuer"):
        verify_nvidia_gpu(vector[0], chain, expected_nonce=None, now=VERIFY_AT)


def test_chain_without_root_is_refused(vector: tuple[bytes, bytes, bytes]) -> None:
    certs = x509.load_pem_x509_certificates(vector[1])
    chain = b"".join(c.public_bytes(Encoding.PEM) for c in certs[:-1])
    with pytest.raises(QuoteVerificationError, match="pinned Device Identity root"):
        verify_nvidia_gpu(vector[0], chain, expected_nonce=None, now=VERIFY_AT)


def test_garbage_chain_is_a_parse_error(vector: tuple[bytes, bytes, bytes]) -> None:
    with pytest.raises(QuoteParseError, match="PEM"):
        verify_nvidia_gpu(vector[0], b"not a chain", expected_nonce=None, now=VERIFY_AT)


# --- forged PKI: a P-384 CA of our own ------------------------------------------------

_KEY_USAGE_CA = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    fwid: bytes | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2022, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2030, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(_KEY_USAGE_CA, critical=True)
    if fwid is not None:
        # Same shape as NVIDIA's: ... SEQUENCE { OID sha384, OCTET STRING fwid }.
        tail = b"\x30\x3d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x02\x04\x30" + fwid
        builder = builder.add_extension(
            x509.UnrecognizedExtension(nvidia_module.TCG_DICE_TCB_INFO_OID, b"\x30\x3f" + tail),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA384())


@dataclasses.dataclass
class _Forged:
    root: x509.Certificate
    chain_pem: bytes
    leaf_key: ec.EllipticCurvePrivateKey


def _forge(fwid: bytes | None) -> _Forged:
    root_key = ec.generate_private_key(ec.SECP384R1())
    ica_key = ec.generate_private_key(ec.SECP384R1())
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    root = _cert(_name("Test Root"), root_key, _name("Test Root"), root_key, ca=True)
    ica = _cert(_name("Test ICA"), ica_key, root.subject, root_key, ca=True)
    leaf = _cert(_name("Test GPU"), leaf_key, ica.subject, ica_key, ca=False, fwid=fwid)
    pem = b"".join(c.public_bytes(Encoding.PEM) for c in (leaf, ica, root))
    return _Forged(root, pem, leaf_key)


def _signed_report(template: NvidiaGpuReport, key: ec.EllipticCurvePrivateKey) -> bytes:
    """`template` re-signed by `key`, with the same layout (r || s, SHA-384)."""
    unsigned = template.raw[:-96]
    r, s = decode_dss_signature(key.sign(unsigned, ec.ECDSA(hashes.SHA384())))
    return unsigned + r.to_bytes(48, "big") + s.to_bytes(48, "big")


def test_chain_to_another_root_is_refused(vector: tuple[bytes, bytes, bytes]) -> None:
    template = parse_nvidia_report(vector[0])
    forged = _forge(template.response.opaque.fwid)
    report = _signed_report(template, forged.leaf_key)
    with pytest.raises(QuoteVerificationError, match="pinned Device Identity root") as info:
        verify_nvidia_gpu(report, forged.chain_pem, expected_nonce=None, now=VERIFY_AT)
    assert hashlib.sha256(forged.root.public_bytes(Encoding.DER)).hexdigest() in str(info.value)


def test_nvidia_root_appended_to_a_foreign_chain_is_refused(
    vector: tuple[bytes, bytes, bytes],
) -> None:
    template = parse_nvidia_report(vector[0])
    forged = _forge(template.response.opaque.fwid)
    nvidia_root = x509.load_der_x509_certificate(NVIDIA_DEVICE_ROOT.der)
    # A CA of ours that claims NVIDIA's root as its issuer, then the real root.
    fake_key = ec.generate_private_key(ec.SECP384R1())
    fake = _cert(_name("Test ICA"), fake_key, nvidia_root.subject, fake_key, ca=True)
    leaf = _cert(
        _name("Test GPU"),
        forged.leaf_key,
        fake.subject,
        fake_key,
        ca=False,
        fwid=template.response.opaque.fwid,
    )
    chain = b"".join(c.public_bytes(Encoding.PEM) for c in (leaf, fake, nvidia_root))
    with pytest.raises(QuoteVerificationError, match="NVIDIA Device Identity CA is invalid"):
        verify_nvidia_gpu(
            _signed_report(template, forged.leaf_key), chain, expected_nonce=None, now=VERIFY_AT
        )


def _pin(monkeypatch: pytest.MonkeyPatch, root: x509.Certificate) -> None:
    trust = TrustRoot(name="Test Root", der=root.public_bytes(Encoding.DER), simulation=True)
    monkeypatch.setattr(nvidia_module, "NVIDIA_DEVICE_ROOT", trust)


def test_own_pki_verifies_when_pinned(
    vector: tuple[bytes, bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same code accepts a well-formed chain to the pinned root: the refusals above
    are about the root, not an accident of the format."""
    template = parse_nvidia_report(vector[0])
    forged = _forge(template.response.opaque.fwid)
    _pin(monkeypatch, forged.root)
    report = _signed_report(template, forged.leaf_key)
    ok = verify_nvidia_gpu(
        report, forged.chain_pem, expected_nonce=bytes.fromhex(EXPECTED_NONCE), now=VERIFY_AT
    )
    assert ok.device_cert.subject == "CN=Test GPU"
    with pytest.raises(QuoteVerificationError, match="not valid at"):
        verify_nvidia_gpu(
            report, forged.chain_pem, expected_nonce=None, now=VERIFY_AT + timedelta(days=3650)
        )


def test_fwid_mismatch_is_refused(
    vector: tuple[bytes, bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    template = parse_nvidia_report(vector[0])
    forged = _forge(bytes(48))
    _pin(monkeypatch, forged.root)
    with pytest.raises(QuoteVerificationError, match="FWID mismatch"):
        verify_nvidia_gpu(
            _signed_report(template, forged.leaf_key),
            forged.chain_pem,
            expected_nonce=None,
            now=VERIFY_AT,
        )


# --- the [gpu] policy -----------------------------------------------------------------


def _reference(tmp_path: Path, measurements: dict[str, list[str]]) -> Path:
    path = tmp_path / "reference.json"
    path.write_text(json.dumps({"measurements": measurements}))
    return path


def test_reference_values_accept(verified: GpuVerified, tmp_path: Path) -> None:
    path = _reference(
        tmp_path, {str(i): [v.hex().upper()] for i, v in verified.measurements.items()}
    )
    policy = NvidiaGpuPolicy.from_dict(
        {
            "reference_values": str(path),
            "min_driver_version": "550.90.07",
            "allowed_vbios_versions": ["96.00.9F.00.01"],
        }
    )
    assert policy.validate(verified) == []


def test_reference_values_reject_exactly(verified: GpuVerified, tmp_path: Path) -> None:
    other = "ab" * 48
    path = _reference(
        tmp_path,
        {"2": [other, "cd" * 48], "3": [verified.measurements[3].hex()], "99": [other]},
    )
    policy = NvidiaGpuPolicy.from_dict(
        {
            "reference_values": path.name,
            "min_driver_version": "550.100.0",
            "allowed_vbios_versions": ["96.00.9f.00.02"],
        },
        base_dir=tmp_path,
    )
    assert policy.validate(verified) == [
        Mismatch("gpu.measurement[2]", f"{other} or {'cd' * 48}", EXPECTED_BLOCK_2),
        Mismatch("gpu.measurement[99]", other, "absent"),
        Mismatch("gpu.driver_version", ">= 550.100.0", "550.90.07"),
        Mismatch("gpu.vbios_version", "96.00.9f.00.02", "96.00.9f.00.01"),
    ]


def test_policy_errors_name_the_field(tmp_path: Path) -> None:
    good = _reference(tmp_path, {"1": ["00" * 48]})
    with pytest.raises(PolicyError, match=r"gpu\.colour"):
        NvidiaGpuPolicy.from_dict({"reference_values": str(good), "colour": "green"})
    with pytest.raises(PolicyError, match=r"gpu\.reference_values is required"):
        NvidiaGpuPolicy.from_dict({})
    with pytest.raises(PolicyError, match=r"gpu\.reference_values .*cannot read"):
        NvidiaGpuPolicy.from_dict({"reference_values": str(tmp_path / "missing.json")})
    with pytest.raises(PolicyError, match=r"gpu\.min_driver_version"):
        NvidiaGpuPolicy.from_dict({"reference_values": str(good), "min_driver_version": "x"})
    with pytest.raises(PolicyError, match=r"gpu\.allowed_vbios_versions"):
        NvidiaGpuPolicy.from_dict({"reference_values": str(good), "allowed_vbios_versions": [1]})
    bad: dict[str, Any]
    for bad in ({"measurements": {"0": ["00"]}}, {"measurements": {"1": ["zz"]}}, {"x": {}}):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(PolicyError, match=r"gpu\.reference_values"):
            NvidiaGpuPolicy.from_dict({"reference_values": str(tmp_path / "bad.json")})
    (tmp_path / "big.json").write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(PolicyError, match="exceeds"):
        NvidiaGpuPolicy.from_dict({"reference_values": str(tmp_path / "big.json")})


# --- the parser on hostile input ------------------------------------------------------


def _parse_or_parse_error(data: bytes) -> None:
    try:
        report = parse_nvidia_report(data)
    except QuoteParseError:
        return
    assert report.to_bytes() == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _parse_or_parse_error(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_real_report(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(_mutation_bases()))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    pos = data.draw(st.integers(0, len(base) - 1))
    if kind == "flip":
        mutated = base[:pos] + bytes([base[pos] ^ data.draw(st.integers(1, 255))]) + base[pos + 1 :]
    elif kind == "truncate":
        mutated = base[:pos]
    elif kind == "insert":
        mutated = base[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + base[pos:]
    else:
        chunk = data.draw(st.binary(min_size=1, max_size=4))
        mutated = base[:pos] + chunk + base[pos + len(chunk) :]
    _parse_or_parse_error(mutated)


def _mutation_bases() -> list[bytes]:
    """A small report built here, and every real report."""
    return [_small_report()] + [
        decode_report_hex(vectors.path(case, "evidence").read_text())
        for case in vectors.cases("nvidia-gpu-spdm")
    ]


def _small_report() -> bytes:
    request = SpdmMeasurementRequest(
        spdm_version=0x11,
        request_code=0xE0,
        param1=1,
        param2=0xFF,
        nonce=bytes(range(32)),
        slot_id_param=0,
    )
    response = SpdmMeasurementResponse(
        spdm_version=0x11,
        response_code=0x60,
        param1=0,
        param2=0,
        blocks=(
            MeasurementBlock(index=1, value_type=1, value=b"\x11" * 48),
            MeasurementBlock(index=2, value_type=0x81, value=b"raw"),
        ),
        nonce=b"\x22" * 32,
        opaque=OpaqueData(
            (
                OpaqueField(3, b"550.90.07\x00"),
                OpaqueField(6, bytes.fromhex("009f009601000000")),
                OpaqueField(12, bytes(8)),
                OpaqueField(200, b"kept raw"),
            )
        ),
        signature=b"\x33" * 96,
    )
    report = NvidiaGpuReport.assemble(request, response)
    assert parse_nvidia_report(report.raw) == report
    assert report.response.opaque.vbios_version == "96.00.9f.00.01"
    return report.raw


def test_built_report_round_trips() -> None:
    raw = _small_report()
    parsed = parse_nvidia_report(raw)
    assert parsed.measurements == {1: b"\x11" * 48, 2: b"raw"}
    assert not parsed.response.blocks[1].is_digest
    assert parsed.response.opaque.driver_version == "550.90.07"
    assert parsed.response.opaque.fields[-1].name == "unknown_200"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:1] + b"\xe1" + b[2:], "GET_MEASUREMENTS"),
        (lambda b: b[:2] + b"\x00" + b[3:], "signed response"),
        (lambda b: b[:37] + b"\x12" + b[38:], "SPDM version"),
        (lambda b: b[:38] + b"\x61" + b[39:], "MEASUREMENTS"),
        (lambda b: b + b"\x01", "signature is 96"),
        (lambda b: b + bytes(5), "up to 4 zero bytes of padding"),
        (lambda b: b + b"\x00\x07", "up to 4 zero bytes of padding"),
        (lambda b: b[:-1], "signature is 96"),
        (lambda b: b[:41] + b"\x00" + b[42:], "no measurement blocks"),
        (lambda b: b[:46] + b"\x02" + b[47:], "specification"),
    ],
)
def test_malformed_reports_name_the_problem(mutate: Any, message: str) -> None:
    with pytest.raises(QuoteParseError, match=message):
        parse_nvidia_report(mutate(_small_report()))


def test_zero_padding_after_the_signature_is_kept_and_not_signed() -> None:
    """Real H100s in Confidential Containers leave one zero byte after the signature."""
    raw = _small_report()
    padded = parse_nvidia_report(raw + b"\x00")
    plain = parse_nvidia_report(raw)
    assert padded.response.trailing_padding == 1
    assert plain.response.trailing_padding == 0
    assert padded.signed_bytes == plain.signed_bytes == raw[:-96]
    assert padded.signature == plain.signature == b"\x33" * 96
    assert padded.to_bytes() == raw + b"\x00"


def test_duplicate_opaque_field_is_refused() -> None:
    raw = _small_report()
    report = parse_nvidia_report(raw)
    twice = (*report.response.opaque.fields, OpaqueField(3, b"999.0\x00"))
    with pytest.raises(ValueError, match="twice"):
        OpaqueData(twice)


def test_hex_decoding_errors() -> None:
    with pytest.raises(QuoteParseError, match="hex"):
        decode_report_hex("abc")
    with pytest.raises(QuoteParseError, match="hex"):
        decode_report_hex("zz")
    assert decode_report_hex(b" 00ff\n") == b"\x00\xff"


# --- every real report in the manifest -----------------------------------------------

# What each real report proves, read off independently (trustee's claims for case 1; the
# CoCo report's opaque data as NVIDIA's and trustee's verifiers print it).
REAL_EXPECTED = {
    "nvidia_h100_trustee_case1": {"trailing_padding": 0, "fwid": EXPECTED_FWID},
    "nvidia_h100_trustee_coco": {
        "trailing_padding": 1,
        "driver_version": "580.95.05",
        "vbios_version": "96.00.74.00.1a",
        "fwid": (
            "f1ae7d0093a3f5689cced58045c9744f94eb2aa4ddca8813"
            "5197fb41a7be45576c2881cf920e2cbcc090b1cb921f7b2d"
        ),
    },
}


@pytest.mark.parametrize("case", vectors.case_params("nvidia-gpu-spdm"))
def test_every_real_report_reaches_its_expected_outcome(case: dict[str, Any]) -> None:
    assert case["expect"] == "ok"
    expected = REAL_EXPECTED[case["id"]]
    report = decode_report_hex(vectors.path(case, "evidence").read_text())
    chain = vectors.path(case, "cert_chain").read_bytes()
    nonce = bytes.fromhex(case["expected_nonce_hex"])
    verified = verify_nvidia_gpu(report, chain, expected_nonce=nonce, now=VERIFY_AT)
    assert verified.nonce == nonce
    assert len(verified.measurements) == 64
    assert verified.fwid is not None and verified.fwid.hex() == expected["fwid"]
    for name in ("driver_version", "vbios_version"):
        if name in expected:
            assert getattr(verified, name) == expected[name]
    parsed = verified.report
    assert parsed.response.trailing_padding == expected["trailing_padding"]
    assert parsed.to_bytes() == report
    with pytest.raises(FreshnessError):
        verify_nvidia_gpu(report, chain, expected_nonce=bytes(32), now=VERIFY_AT)
    if expected["trailing_padding"]:
        # the padding is not signed, but anything other than zeros there is refused
        with pytest.raises(QuoteParseError, match="zero bytes of padding"):
            verify_nvidia_gpu(report[:-1] + b"\x01", chain, expected_nonce=nonce, now=VERIFY_AT)
