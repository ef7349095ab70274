"""parse_tdx_quote: exact fields of real TDX quotes (v4 and v5), byte-exact round trips,
refusals with QuoteParseError, and no other exception for any input."""

from __future__ import annotations

import dataclasses
import struct

import dcap_qvl  # type: ignore[import-untyped]  # has a .pyi but no py.typed marker
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.attestation.intel.tdx_quote import (
    MAX_CERT_DATA_SIZE,
    MAX_QUOTE_SIZE,
    TD_REPORT10_SIZE,
    TD_REPORT15_SIZE,
    TdReportBody,
    TdxQuote,
    parse_tdx_quote,
)
from blindinfer.attestation.roots import INTEL_SGX_ROOT
from blindinfer.errors import QuoteParseError
from support import vectors
from support.vectors import VECTORS

FILES = VECTORS / "files"

# Offsets in a v4 quote: body at 48, signature data length at 632, signature data at 636.
V4_SIG_LEN = 48 + TD_REPORT10_SIZE
V4_SIG = V4_SIG_LEN + 4
V4_CERT_TYPE = V4_SIG + 128
V4_QE_CERT = V4_CERT_TYPE + 6
V4_QE_AUTH_LEN = V4_QE_CERT + 384 + 64


def _read(relative: str) -> bytes:
    return (FILES / relative).read_bytes()


def _tdx_cases() -> list[tuple[str, str]]:
    """(id, evidence path) of every intel-dcap case whose quote is TDX (v4 or v5)."""
    cases: list[tuple[str, str]] = []
    for case in vectors.cases("intel-dcap"):
        if case.get("evidence_encoding") != "binary":
            continue
        head = (VECTORS / case["evidence"]).read_bytes()[:2]
        if int.from_bytes(head, "little") in (4, 5):
            cases.append((case["id"], case["evidence"]))
    return cases


TDX_CASES = _tdx_cases()


@pytest.fixture(scope="module")
def v4() -> bytes:
    return _read("phala-dcap-qvl/sample_tdx_quote")


@pytest.fixture(scope="module")
def v5() -> bytes:
    return _read("go-tdx-guest/quote_v5_sample.dat")


def test_the_manifest_has_tdx_cases() -> None:
    ids = {case_id for case_id, _ in TDX_CASES}
    assert {"tdx_v4_phala", "tdx_v4_gcp_cos113", "tdx_v5_td15_gotdxguest"} <= ids


@pytest.mark.parametrize(("case_id", "evidence"), TDX_CASES)
def test_every_real_tdx_quote_round_trips(case_id: str, evidence: str) -> None:
    raw = (VECTORS / evidence).read_bytes()
    q = parse_tdx_quote(raw)
    assert q.raw == raw
    assert q.to_bytes() == raw, case_id
    rebuilt = TdxQuote.assemble(q.header, q.body, q.signature, trailing=q.trailing)
    assert rebuilt.raw == raw
    assert q.signature.certificates[-1] == INTEL_SGX_ROOT.der
    # Cross-check with dcap-qvl's own parser.
    theirs = dcap_qvl.parse_quote(raw).report
    for ours, their_name in (
        ("mrtd", "mr_td"),
        ("mrseam", "mr_seam"),
        ("mrsignerseam", "mr_signer_seam"),
        ("td_attributes", "td_attributes"),
        ("xfam", "xfam"),
        ("mrconfigid", "mr_config_id"),
        ("mrowner", "mr_owner"),
        ("mrownerconfig", "mr_owner_config"),
        ("rtmr0", "rt_mr0"),
        ("rtmr1", "rt_mr1"),
        ("rtmr2", "rt_mr2"),
        ("rtmr3", "rt_mr3"),
        ("report_data", "report_data"),
        ("tee_tcb_svn", "tee_tcb_svn"),
    ):
        assert getattr(q.body, ours) == getattr(theirs, their_name), (case_id, ours)


def test_real_v4_quote_exact_fields(v4: bytes) -> None:
    q = parse_tdx_quote(v4)
    assert len(v4) == 5006
    h = q.header
    assert (h.version, h.att_key_type, h.tee_type) == (4, 2, 0x81)
    assert h.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    assert (q.body_type, q.is_td15, q.body.is_td15) == (2, False, False)
    b = q.body
    assert b.mrtd.hex() == (
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
        "de03ae6dc5f87f27428b2538873118b7"
    )
    assert b.td_attributes.hex() == "0000001000000000"
    assert b.xfam.hex() == "e702060000000000"
    assert b.tee_tcb_svn.hex() == "06010300000000000000000000000000"
    assert b.rtmr0.hex().startswith("44c0197b39157fdd7a4dcc44767f9d6b")
    assert b.mrseam.hex().startswith("5b38e33a6487958b72c3c12a938eaa5e")
    assert b.report_data.hex().startswith("9a9d48e7f6799642")
    assert (b.debug, b.sept_ve_disable, b.td_attributes_int) == (False, True, 1 << 28)
    assert (b.tee_tcb_svn2, b.mrservicetd) == (None, None)
    assert b.to_bytes() == v4[48 : 48 + TD_REPORT10_SIZE]
    assert q.signed_bytes == v4[:V4_SIG_LEN]
    s = q.signature
    assert s.cert_data_type == 6
    qe = s.qe_report_certification
    assert (qe.cert_data_type, len(qe.qe_auth_data), len(qe.cert_data)) == (5, 32, 3678)
    assert len(s.certificates) == 3
    # 70 bytes of zero padding follow the signature data; they are kept, not interpreted.
    assert q.trailing == bytes(70)


def test_real_v5_td15_quote_exact_fields(v5: bytes) -> None:
    q = parse_tdx_quote(v5)
    assert len(v5) == 5006
    assert (q.header.version, q.header.tee_type, q.body_type, q.is_td15) == (5, 0x81, 3, True)
    assert struct.unpack_from("<HI", v5, 48) == (3, TD_REPORT15_SIZE)
    b = q.body
    assert b.mrtd.hex() == (
        "7348651a34b2d2d3462822e3a750ec6110125f36757c78480bbfc69cc0d21fb0"
        "01a1ced3ee19747dda8f750c3bc8f876"
    )
    assert b.td_attributes.hex() == "0000001000000000"
    assert b.xfam.hex() == "e702060000000000"
    assert b.rtmr0.hex().startswith("5c8daf76063a71ac8fcef4067564661f")
    assert b.tee_tcb_svn.hex() == "0b010400000000000000000000000000"
    assert b.tee_tcb_svn2 is not None
    assert b.tee_tcb_svn2.hex() == "0d010400000000000000000000000000"
    assert b.mrservicetd == bytes(48)
    assert (b.debug, b.sept_ve_disable) == (False, True)
    assert b.to_bytes() == v5[54 : 54 + TD_REPORT15_SIZE]
    # The v5 signature covers the header, the body descriptor and the body.
    assert q.signed_bytes == v5[: 54 + TD_REPORT15_SIZE]
    assert q.trailing == b""
    theirs = dcap_qvl.parse_quote(v5).report
    assert (theirs.tee_tcb_svn2, theirs.mr_service_td) == (b.tee_tcb_svn2, b.mrservicetd)


def test_real_gcp_quote_is_zero_padded_to_8000_bytes() -> None:
    raw = _read("go-tdx-guest/ccel_cos-113-tdx-quote.dat")
    q = parse_tdx_quote(raw)
    assert (len(raw), len(q.trailing), set(q.trailing)) == (8000, 3065, {0})
    assert q.body.mrtd.hex() == (
        "dae67181d3d65e073ad8f95b7907d5e927bfe9761c9ff3e9b89734a45d8954db"
        "a41394c7717cb2735396c1d04231f94a"
    )
    assert q.body.rtmr0.hex().startswith("3fa2f61f395b7f5feefb4ec2df61297f")
    assert q.body.tee_tcb_svn.hex() == "04010700000000000000000000000000"
    assert q.body.xfam.hex() == "e700060000000000"
    assert q.to_bytes() == raw


def test_real_spr_e4_quote_without_sept_ve_disable() -> None:
    raw = _read("go-tdx-guest/tdx_prod_quote_SPR_E4.dat")
    q = parse_tdx_quote(raw)
    assert q.body.td_attributes.hex() == "0000004000000000"
    assert (q.body.debug, q.body.sept_ve_disable) == (False, False)
    assert q.trailing == b"\nextra bytes(only for testing purpose)\n"
    assert q.to_bytes() == raw


# ---------------------------------------------------------------- refusals


def _expect_error(data: bytes, phrase: str) -> None:
    with pytest.raises(QuoteParseError, match=phrase):
        parse_tdx_quote(data)


def _patch(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_refuses_wrong_versions_and_types(v4: bytes) -> None:
    _expect_error(_patch(v4, 0, "<H", 3), "version 3 is not 4 or 5")
    _expect_error(_patch(v4, 2, "<H", 3), "attestation key type 3")
    _expect_error(_patch(v4, 4, "<I", 0), "TEE type 0x0 is not 0x81")


def test_refuses_unknown_v5_body_types(v5: bytes) -> None:
    _expect_error(_patch(v5, 48, "<H", 4), "body type 4 .*not supported")
    _expect_error(_patch(v5, 48, "<H", 1), "SGX enclave report")
    _expect_error(_patch(v5, 48, "<H", 9), "body type 9 is unknown")
    _expect_error(_patch(v5, 50, "<I", TD_REPORT10_SIZE), "648 bytes, not 584")
    # Type 2 (TD 1.0) with a TD 1.5 size is refused too.
    _expect_error(_patch(v5, 48, "<H", 2), "584 bytes, not 648")


def test_refuses_truncations(v4: bytes, v5: bytes) -> None:
    _expect_error(b"", "shorter than its header")
    _expect_error(v4[:47], "shorter than its header")
    _expect_error(v5[:50], "ends inside its body type and size")
    _expect_error(v4[: V4_SIG_LEN + 3], "shorter than header \\+ body \\+ length")
    _expect_error(v4[: V4_SIG + 100], "exceeds the 100 bytes left")


def test_refuses_bad_certification_data(v4: bytes) -> None:
    _expect_error(_patch(v4, V4_CERT_TYPE, "<H", 5), "type 5 is not 6")
    _expect_error(_patch(v4, V4_CERT_TYPE + 2, "<I", MAX_CERT_DATA_SIZE + 1), "exceeds 65536")
    _expect_error(_patch(v4, V4_CERT_TYPE + 2, "<I", 4165), "does not match the 4166 bytes")
    _expect_error(_patch(v4, V4_QE_AUTH_LEN, "<H", 0xFFFF), "qe_auth_data length 65535")
    # Signature data length one short: the certification data no longer fits.
    _expect_error(_patch(v4, V4_SIG_LEN, "<I", 4299), "does not match the 4165 bytes")


def test_inner_cert_type_other_than_5_parses_but_has_no_chain(v4: bytes) -> None:
    offset = V4_QE_AUTH_LEN + 2 + 32
    q = parse_tdx_quote(_patch(v4, offset, "<H", 3))
    assert q.signature.qe_report_certification.cert_data_type == 3
    with pytest.raises(QuoteParseError, match="type 3 carries no PEM chain"):
        _ = q.signature.certificates


def test_refuses_oversized_input() -> None:
    _expect_error(bytes(MAX_QUOTE_SIZE + 1), "exceeds 1048576 bytes")


def test_refuses_non_bytes() -> None:
    with pytest.raises(QuoteParseError, match="must be bytes"):
        parse_tdx_quote("not bytes")  # type: ignore[arg-type]


def test_body_fields_are_checked_at_construction(v4: bytes) -> None:
    body = parse_tdx_quote(v4).body
    with pytest.raises(ValueError, match="mrtd must be 48 bytes"):
        dataclasses.replace(body, mrtd=bytes(32))
    with pytest.raises(ValueError, match="both set"):
        dataclasses.replace(body, tee_tcb_svn2=bytes(16))
    td15 = dataclasses.replace(body, tee_tcb_svn2=bytes(16), mrservicetd=bytes(48))
    assert isinstance(td15, TdReportBody)
    assert len(td15.to_bytes()) == TD_REPORT15_SIZE


def test_debug_bit_is_byte_0_bit_0(v4: bytes) -> None:
    body = parse_tdx_quote(v4).body
    debug = dataclasses.replace(body, td_attributes=bytes([1]) + body.td_attributes[1:])
    assert (debug.debug, debug.sept_ve_disable) == (True, True)


# ---------------------------------------------------------------- fuzzing

_FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _only_parse_errors(data: bytes) -> None:
    try:
        q = parse_tdx_quote(data)
    except QuoteParseError:
        return
    assert q.to_bytes() == data


@_FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    _only_parse_errors(data)


@_FUZZ
@given(
    st.sampled_from(["phala-dcap-qvl/sample_tdx_quote", "go-tdx-guest/quote_v5_sample.dat"]),
    st.lists(st.tuples(st.integers(0, 5005), st.integers(0, 255)), max_size=8),
    st.integers(0, 5006),
)
def test_fuzz_mutated_real_quotes(name: str, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray((FILES / name).read_bytes())
    for offset, value in edits:
        data[offset] = value
    _only_parse_errors(bytes(data[:cut]))
    _only_parse_errors(bytes(data))


@_FUZZ
@given(
    st.sampled_from([0, 2, 48, 50, V4_SIG_LEN, V4_CERT_TYPE, V4_CERT_TYPE + 2, V4_QE_AUTH_LEN]),
    st.integers(0, 0xFFFFFFFF),
)
def test_fuzz_length_and_type_fields(offset: int, value: int) -> None:
    data = bytearray((FILES / "phala-dcap-qvl/sample_tdx_quote").read_bytes())
    data[offset : offset + 4] = value.to_bytes(4, "little")
    _only_parse_errors(bytes(data))
