"""verify_evidence end to end, in-process: a real TLS identity, a SimulationPlatform and
the evidence document exactly as the server builds it; one failure mode per test.
Also the evidence wire format (protocol/evidence.py)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.attestation.intel.sgx_quote import HEADER_SIZE, SIGNED_SIZE, parse_sgx_quote
from blindinfer.attestation.policy import Policy, SgxPolicy
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.attestation.roots import SIMULATION_ROOT
from blindinfer.attestation.verifier import certificate_key_hash, verify_evidence
from blindinfer.errors import (
    DebugEnclaveError,
    FreshnessError,
    KeyBindingError,
    Mismatch,
    PolicyMismatchError,
    ProtocolError,
    QuoteVerificationError,
    SimulationNotAllowedError,
)
from blindinfer.protocol.evidence import (
    EvidenceDocument,
    encode_evidence_document,
    encode_nonce_request,
    parse_evidence_document,
    parse_nonce_request,
)
from blindinfer.server.tls import TlsIdentity, make_tls_identity
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER, SimulationPlatform

MRE = bytes(range(32))
NONCE = bytes(range(200, 232))
IDENTITY = make_tls_identity()
OTHER_IDENTITY = make_tls_identity()
PLATFORM = SimulationPlatform(MRE, isvprodid=5, isvsvn=2)


def evidence(
    platform: SimulationPlatform = PLATFORM, identity: TlsIdentity = IDENTITY, nonce: bytes = NONCE
) -> EvidenceDocument:
    """Exactly what server/state.py's ServerState.evidence_for builds."""
    produced = platform.evidence(identity.spki_sha256 + nonce)
    return EvidenceDocument(
        kind=produced.kind,
        platform=platform.kind,
        nonce=nonce,
        quote=produced.quote,
        collateral_json=produced.collateral_json,
        certificate_der=identity.certificate_der,
    )


DOC = evidence()
NOW = int(time.time())


def verify(
    document: EvidenceDocument = DOC,
    *,
    policy: Policy | None = None,
    nonce: bytes = NONCE,
    certificate: bytes = IDENTITY.certificate_der,
    allow_simulation: bool = True,
    now: int | None = NOW,
) -> VerifiedAttestation:
    return verify_evidence(
        document,
        policy=policy,
        expected_nonce=nonce,
        tls_certificate_der=certificate,
        allow_simulation=allow_simulation,
        now=now,
    )


def _policy(**fields: object) -> Policy:
    return Policy(sgx=SgxPolicy(**fields))  # type: ignore[arg-type]


def test_success_returns_exact_fields() -> None:
    policy = _policy(
        mrenclave=(MRE,), mrsigner=(SIMULATION_MRSIGNER,), isvprodid=(5,), min_isvsvn=2
    )
    result = verify(policy=policy)
    assert result == VerifiedAttestation(
        kind="intel-sgx",
        root=SIMULATION_ROOT.name,
        simulation=True,
        tcb_status="UpToDate",
        advisory_ids=(),
        claims={
            "mrenclave": MRE.hex(),
            "mrsigner": SIMULATION_MRSIGNER.hex(),
            "isvprodid": 5,
            "isvsvn": 2,
            "attributes": (bytes([0x05]) + bytes(7) + bytes([0x03]) + bytes(7)).hex(),
            "miscselect": bytes(4).hex(),
            "cpusvn": result.claims["cpusvn"],
            "config_id": bytes(64).hex(),
            "config_svn": 0,
            "debug": False,
        },
        report_data=IDENTITY.spki_sha256 + NONCE,
        certificate_der=IDENTITY.certificate_der,
        nonce=NONCE,
        verified_at=NOW,
    )
    assert result.root == "Blindinfer SIMULATION SGX Root CA"
    assert result.to_dict()["claims"]["mrenclave"] == MRE.hex()
    assert result.summary().startswith("SIMULATION (no TEE, no confidentiality)")


def test_default_now_is_the_current_time() -> None:
    before = int(time.time())
    result = verify(now=None)
    after = int(time.time())
    assert before <= result.verified_at <= after


def test_certificate_key_hash_is_the_identity_spki_hash() -> None:
    assert certificate_key_hash(IDENTITY.certificate_der) == IDENTITY.spki_sha256
    assert certificate_key_hash(OTHER_IDENTITY.certificate_der) == OTHER_IDENTITY.spki_sha256
    assert IDENTITY.spki_sha256 != OTHER_IDENTITY.spki_sha256


def test_simulation_refused_unless_allowed() -> None:
    with pytest.raises(SimulationNotAllowedError, match="SIMULATION mode"):
        verify(allow_simulation=False)


def test_other_nonce_is_a_freshness_error() -> None:
    with pytest.raises(FreshnessError, match="nonce"):
        verify(nonce=bytes(32))


def test_replayed_evidence_for_another_nonce_is_a_freshness_error() -> None:
    old = evidence(nonce=b"\x01" * 32)
    with pytest.raises(FreshnessError):
        verify(old)  # the client expects NONCE
    assert verify(old, nonce=b"\x01" * 32).nonce == b"\x01" * 32


def test_other_tls_certificate_is_a_key_binding_error() -> None:
    with pytest.raises(KeyBindingError, match="TLS key"):
        verify(certificate=OTHER_IDENTITY.certificate_der)


def test_the_document_certificate_is_not_trusted() -> None:
    # A MITM swaps the informative certificate in the document: the handshake cert decides.
    swapped = dataclasses.replace(DOC, certificate_der=OTHER_IDENTITY.certificate_der)
    assert verify(swapped).certificate_der == IDENTITY.certificate_der
    with pytest.raises(KeyBindingError):
        verify(swapped, certificate=OTHER_IDENTITY.certificate_der)


def test_unparseable_tls_certificate_is_a_key_binding_error() -> None:
    with pytest.raises(KeyBindingError, match="cannot be parsed"):
        verify(certificate=b"not a certificate")


def _flip(data: bytes, offset: int) -> bytes:
    flipped = bytearray(data)
    flipped[offset] ^= 0x01
    return bytes(flipped)


@pytest.mark.parametrize(
    "offset",
    [
        pytest.param(HEADER_SIZE + 64, id="mrenclave"),
        pytest.param(HEADER_SIZE + 128, id="mrsigner"),
        pytest.param(HEADER_SIZE + 256, id="isvprodid"),
        pytest.param(HEADER_SIZE + 320, id="report_data"),
        pytest.param(HEADER_SIZE + 383, id="report_data-last"),
        pytest.param(SIGNED_SIZE + 4, id="signature-first"),
        pytest.param(SIGNED_SIZE + 4 + 63, id="signature-last"),
    ],
)
def test_flipped_byte_in_signed_data_or_signature(offset: int) -> None:
    document = dataclasses.replace(DOC, quote=_flip(DOC.quote, offset))
    with pytest.raises(QuoteVerificationError) as info:
        verify(document)
    # Exactly QuoteVerificationError: not a subclass (debug, simulation, parse) that would
    # mislabel forged evidence, and not a later step's error.
    assert type(info.value) is QuoteVerificationError
    assert "dcap-qvl rejected the quote" in str(info.value)


# Regression (fixed in verifier.py): DebugEnclaveError only when dcap-qvl names debug.
@pytest.mark.parametrize(
    ("debug_platform", "offset", "mask"),
    [
        pytest.param(False, HEADER_SIZE + 48, 0x02, id="debug-bit-set-by-forger"),
        pytest.param(True, SIGNED_SIZE + 4, 0x01, id="debug-quote-with-bad-signature"),
    ],
)
def test_forged_quote_with_debug_bit_is_not_labelled_debug(
    debug_platform: bool, offset: int, mask: int
) -> None:
    source = evidence(SimulationPlatform(MRE, debug=True)) if debug_platform else DOC
    forged = bytearray(source.quote)
    forged[offset] ^= mask
    assert parse_sgx_quote(bytes(forged)).body.debug
    with pytest.raises(QuoteVerificationError) as info:
        verify(dataclasses.replace(source, quote=bytes(forged)))
    assert "signature is invalid" in str(info.value)
    assert type(info.value) is QuoteVerificationError


def test_flipped_byte_in_qe_report_is_rejected() -> None:
    offset = SIGNED_SIZE + 4 + 128 + 64  # QE report's mrenclave
    with pytest.raises(QuoteVerificationError) as info:
        verify(dataclasses.replace(DOC, quote=_flip(DOC.quote, offset)))
    assert type(info.value) is QuoteVerificationError


def test_truncated_quote_is_a_parse_error() -> None:
    from blindinfer.errors import QuoteParseError

    with pytest.raises(QuoteParseError):
        verify(dataclasses.replace(DOC, quote=DOC.quote[:-1]))


def test_debug_platform_is_a_debug_enclave_error() -> None:
    debug = evidence(SimulationPlatform(MRE, debug=True))
    with pytest.raises(DebugEnclaveError, match="debug enclave") as info:
        verify(debug)
    assert "Debug mode is enabled" in str(info.value)
    with pytest.raises(DebugEnclaveError):
        verify(debug, policy=_policy(mrenclave=(MRE,)))


def test_policy_mismatch_lists_the_mismatches() -> None:
    other_mre = b"\x42" * 32
    policy = _policy(mrenclave=(other_mre,), isvprodid=(6,), min_isvsvn=3)
    with pytest.raises(PolicyMismatchError) as info:
        verify(policy=policy)
    assert info.value.mismatches == (
        Mismatch("mrenclave", other_mre.hex(), MRE.hex()),
        Mismatch("isvprodid", "6", "5"),
        Mismatch("isvsvn", ">= 3", "2"),
    )


def test_policy_tcb_status_mismatch() -> None:
    policy = _policy(mrenclave=(MRE,), tcb_statuses=frozenset({"SWHardeningNeeded"}))
    with pytest.raises(PolicyMismatchError) as info:
        verify(policy=policy)
    assert info.value.mismatches == (Mismatch("tcb_status", "SWHardeningNeeded", "UpToDate"),)


def test_policy_none_checks_authenticity_only() -> None:
    other = evidence(SimulationPlatform(b"\x99" * 32, isvprodid=77, isvsvn=0))
    result = verify(other, policy=None)
    assert (result.mrenclave, result.isvprodid, result.isvsvn) == (b"\x99" * 32, 77, 0)
    # ... but authenticity, freshness and binding still apply.
    with pytest.raises(FreshnessError):
        verify(other, policy=None, nonce=bytes(32))
    with pytest.raises(QuoteVerificationError):
        verify(dataclasses.replace(other, quote=_flip(other.quote, HEADER_SIZE + 64)), policy=None)


def test_expired_collateral_40_days_later() -> None:
    with pytest.raises(QuoteVerificationError, match=r"(?i)expired") as info:
        verify(now=NOW + 40 * 86400)
    assert type(info.value) is QuoteVerificationError


def test_collateral_not_yet_valid_long_before() -> None:
    with pytest.raises(QuoteVerificationError) as info:
        verify(now=NOW - 2 * 86400)
    assert type(info.value) is QuoteVerificationError


def _collateral_with(**changes: str) -> str:
    collateral = json.loads(DOC.collateral_json)
    collateral.update(changes)
    return json.dumps(collateral)


def test_tampered_tcb_info_is_rejected() -> None:
    tcb_info = json.loads(DOC.collateral_json)["tcb_info"]
    assert '"pcesvn":13' in tcb_info
    tampered = _collateral_with(tcb_info=tcb_info.replace('"pcesvn":13', '"pcesvn":12'))
    with pytest.raises(QuoteVerificationError, match="tcb_info") as info:
        verify(dataclasses.replace(DOC, collateral_json=tampered))
    assert type(info.value) is QuoteVerificationError


def test_tampered_tcb_status_in_tcb_info_is_rejected() -> None:
    tcb_info = json.loads(DOC.collateral_json)["tcb_info"]
    tampered = _collateral_with(tcb_info=tcb_info.replace("UpToDate", "OutOfDate"))
    with pytest.raises(QuoteVerificationError):
        verify(dataclasses.replace(DOC, collateral_json=tampered))


def test_tampered_qe_identity_is_rejected() -> None:
    qe_identity = json.loads(DOC.collateral_json)["qe_identity"]
    tampered = _collateral_with(qe_identity=qe_identity.replace('"isvprodid":1', '"isvprodid":2'))
    assert tampered != DOC.collateral_json
    with pytest.raises(QuoteVerificationError) as info:
        verify(dataclasses.replace(DOC, collateral_json=tampered))
    assert type(info.value) is QuoteVerificationError


@pytest.mark.parametrize("collateral", ["", "{}", "[]", "not json", '{"tcb_info": 1}'])
def test_malformed_collateral_is_rejected(collateral: str) -> None:
    with pytest.raises(QuoteVerificationError) as info:
        verify(dataclasses.replace(DOC, collateral_json=collateral))
    assert type(info.value) is QuoteVerificationError


def test_evidence_from_another_simulated_platform_instance_still_verifies() -> None:
    # Each platform has its own attestation key, certified by the same simulated PCK.
    assert verify(evidence(SimulationPlatform(MRE))).mrenclave == MRE


# ----------------------------------------------------------------------------- wire format


def test_evidence_document_round_trip() -> None:
    wire = encode_evidence_document(DOC)
    assert parse_evidence_document(wire) == DOC
    document = json.loads(wire)
    assert set(document) == {
        "version",
        "kind",
        "platform",
        "nonce",
        "quote",
        "collateral",
        "certificates",
        "crl",
        "certificate",
        "gpus",
    }
    assert document["crl"] is None  # AMD's CRL travels only with amd-snp evidence
    assert document["version"] == 1
    assert document["kind"] == "intel-sgx"
    assert document["platform"] == "simulation"
    assert document["nonce"] == NONCE.hex()
    assert base64.b64decode(document["quote"]) == DOC.quote
    assert base64.b64decode(document["certificate"]) == IDENTITY.certificate_der
    assert document["collateral"] == json.loads(DOC.collateral_json)
    # The parsed document still verifies.
    assert verify(parse_evidence_document(wire)).report_data == IDENTITY.spki_sha256 + NONCE


def test_nonce_request_round_trip() -> None:
    nonce = os.urandom(32)
    assert parse_nonce_request(encode_nonce_request(nonce)) == nonce


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"nonce": "00"}', "invalid_nonce"),
        (b'{"nonce": "' + b"00" * 33 + b'"}', "invalid_nonce"),
        (b'{"nonce": "zz"}', "invalid_nonce"),
        (b'{"nonce": 5}', "invalid_nonce"),
        (b"{}", "invalid_nonce"),
        (b"[]", "malformed_json"),
        (b"{", "malformed_json"),
        (b"\xff", "malformed_json"),
        (b" " * 4097, "too_large"),
    ],
)
def test_nonce_request_errors(body: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_nonce_request(body)
    assert info.value.code == code


def _wire(**changes: object) -> bytes:
    document = json.loads(encode_evidence_document(DOC))
    document.update(changes)
    for key, value in list(document.items()):
        if value is _DROP:
            del document[key]
    return json.dumps(document).encode()


_DROP = object()


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"version": 2}, "unsupported_evidence"),
        ({"version": _DROP}, "unsupported_evidence"),
        ({"kind": "arm-cca"}, "unsupported_evidence"),
        ({"certificates": {"root": "AAAA"}}, "malformed_evidence"),
        ({"certificates": []}, "malformed_evidence"),
        ({"gpus": [{"kind": "amd-mi300"}]}, "malformed_evidence"),
        ({"gpus": {}}, "malformed_evidence"),
        ({"kind": None}, "unsupported_evidence"),
        ({"platform": 5}, "malformed_evidence"),
        ({"platform": "x" * 65}, "malformed_evidence"),
        ({"collateral": "{}"}, "malformed_evidence"),
        ({"collateral": {"x": "y" * (256 * 1024)}}, "malformed_evidence"),
        ({"nonce": "xyz"}, "malformed_evidence"),
        ({"nonce": _DROP}, "malformed_evidence"),
        ({"quote": "!!!!"}, "malformed_evidence"),
        ({"quote": 5}, "malformed_evidence"),
        ({"quote": "A" * (64 * 1024 * 4 // 3 + 8)}, "malformed_evidence"),
        ({"certificate": "abc"}, "malformed_evidence"),
    ],
)
def test_evidence_document_errors(changes: dict[str, object], code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_evidence_document(_wire(**changes))
    assert info.value.code == code


def test_evidence_document_too_large() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_evidence_document(b" " * (1024 * 1024 + 1))
    assert info.value.code == "too_large"


# Regression (fixed in protocol/evidence.py): an unhashable kind raised TypeError.
@pytest.mark.parametrize("kind", [[], {}, ["intel-sgx"], {"intel-sgx": 1}, 1, True])
def test_non_string_kind_is_a_protocol_error(kind: object) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_evidence_document(_wire(kind=kind))
    assert info.value.code == "unsupported_evidence"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_protocol_error(body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_evidence_document(body)
    with contextlib.suppress(ProtocolError):
        parse_nonce_request(body)


_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=80),
    st.sampled_from(["intel-sgx", NONCE.hex(), base64.b64encode(b"abc").decode(), "00"]),
)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)
_FIELDS = st.sampled_from(
    ["version", "kind", "platform", "nonce", "quote", "collateral", "certificate"]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_FIELDS, _JSON_VALUES, max_size=7))
def test_structured_documents_raise_only_protocol_error(changes: dict[str, object]) -> None:
    try:
        parsed = parse_evidence_document(_wire(**changes))
    except ProtocolError:
        return
    assert parsed.kind == "intel-sgx"
    assert isinstance(parsed.quote, bytes)
