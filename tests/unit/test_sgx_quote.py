"""parse_sgx_quote: exact fields of a real quote, byte-exact round trips, and no exception
other than QuoteParseError for any input."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import struct

import dcap_qvl  # type: ignore[import-untyped]  # has a .pyi but no py.typed marker
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.attestation.intel.sgx_quote import (
    MAX_CERT_DATA_SIZE,
    SIGNED_SIZE,
    SgxQuote,
    SgxReportBody,
    parse_sgx_quote,
)
from blindinfer.attestation.roots import INTEL_SGX_ROOT, SIMULATION_ROOT
from blindinfer.errors import QuoteParseError
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER, SimulationPlatform
from support.vectors import VECTORS

REAL_SGX = VECTORS / "files" / "phala-dcap-qvl" / "sample_sgx_quote"
REAL_TDX = VECTORS / "files" / "phala-dcap-qvl" / "sample_tdx_quote"

# Offsets inside the signature data of a v3 quote (after its u32 length at 432).
SIG = SIGNED_SIZE + 4
QE_AUTH_LEN = SIG + 64 + 64 + 384 + 64


@pytest.fixture(scope="module")
def real() -> bytes:
    return REAL_SGX.read_bytes()


_SIM_QUOTE = (
    SimulationPlatform(bytes(range(32)), isvprodid=7, isvsvn=3)
    .evidence(bytes(range(64, 128)))
    .quote
)


@pytest.fixture(scope="module")
def sim() -> bytes:
    return _SIM_QUOTE


def test_real_sgx_quote_exact_fields(real: bytes) -> None:
    q = parse_sgx_quote(real)
    assert len(real) == 4600
    h = q.header
    assert (h.version, h.att_key_type, h.tee_type, h.qe_svn, h.pce_svn) == (3, 2, 0, 10, 15)
    assert h.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    b = q.body
    assert b.mrenclave.hex() == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert b.mrsigner.hex() == "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    assert b.cpusvn.hex() == "0b0b1a18ffff04000000000000000000"
    assert b.attributes.hex() == "0500000000000000e700000000000000"
    assert (b.flags, b.xfrm, b.debug) == (0x05, 0xE7, False)
    assert (b.miscselect, b.isvprodid, b.isvsvn, b.config_svn) == (0, 0, 0, 0)
    assert b.report_data == b"Hello, world!" + bytes(51)
    s = q.signature
    assert (s.cert_data_type, len(s.qe_auth_data), len(s.cert_data)) == (5, 32, 3548)
    chain = s.certificates
    assert len(chain) == 3
    assert chain[-1] == INTEL_SGX_ROOT.der
    # Independent cross-check with dcap-qvl's own parser.
    theirs = dcap_qvl.parse_quote(real)
    assert theirs.report.mr_enclave == b.mrenclave
    assert theirs.report.report_data == b.report_data
    assert theirs.header.qe_svn == h.qe_svn


def test_real_quote_round_trips(real: bytes) -> None:
    q = parse_sgx_quote(real)
    assert q.raw == real
    assert q.to_bytes() == real
    assert q.signed_bytes == real[:432]
    assert SgxQuote.assemble(q.header, q.body, q.signature).raw == real


def test_simulation_quote_round_trips_and_carries_its_fields(sim: bytes) -> None:
    q = parse_sgx_quote(sim)
    assert q.to_bytes() == sim
    assert q.body.mrenclave == bytes(range(32))
    assert q.body.report_data == bytes(range(64, 128))
    assert (q.body.isvprodid, q.body.isvsvn, q.body.flags, q.body.xfrm) == (7, 3, 0x05, 0x03)
    assert q.body.mrsigner == SIMULATION_MRSIGNER
    assert q.header.user_data == b"blindinfer SIMULATIO"
    assert q.signature.certificates[-1] == SIMULATION_ROOT.der


def _with(raw: bytes, offset: int, new: bytes) -> bytes:
    return raw[:offset] + new + raw[offset + len(new) :]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda q: q[:100], "shorter than header + report body"),
        (lambda q: q + b"\x00", "1 trailing bytes after the signature data"),
        (lambda q: q[:-1], "exceeds the"),
        (lambda q: _with(q, 0, struct.pack("<H", 4)), "version 4 is not 3"),
        (lambda q: _with(q, 2, struct.pack("<H", 3)), "attestation key type 3"),
        (lambda q: _with(q, 4, struct.pack("<I", 0x81)), "TEE type 0x81"),
        (lambda q: _with(q, QE_AUTH_LEN, struct.pack("<H", 0xFFFF)), "qe_auth_data length"),
        (
            lambda q: _with(q, QE_AUTH_LEN + 36, struct.pack("<I", MAX_CERT_DATA_SIZE + 1)),
            "exceeds 65536 bytes",
        ),
        (lambda q: b"\x03\x00\x02\x00" + bytes(1024 * 1024), "exceeds 1048576 bytes"),
    ],
)
def test_malformed_quotes_are_refused_with_a_reason(mutate: object, message: str) -> None:
    raw = REAL_SGX.read_bytes()
    assert callable(mutate)
    with pytest.raises(QuoteParseError, match=re.escape(message)):
        parse_sgx_quote(mutate(raw))


def test_tdx_quote_is_not_an_sgx_quote() -> None:
    with pytest.raises(QuoteParseError, match="version 4 is not 3"):
        parse_sgx_quote(REAL_TDX.read_bytes())


def test_non_bytes_is_a_parse_error() -> None:
    with pytest.raises(QuoteParseError, match="must be bytes"):
        parse_sgx_quote("not bytes")  # type: ignore[arg-type]


def test_bad_pem_in_certification_data(sim: bytes) -> None:
    q = parse_sgx_quote(sim)
    junk = dataclasses.replace(q.signature, cert_data=b"garbage" + q.signature.cert_data)
    with pytest.raises(QuoteParseError, match="unexpected bytes around a certificate"):
        _ = junk.certificates
    other = dataclasses.replace(q.signature, cert_data_type=3)
    with pytest.raises(QuoteParseError, match="type 3 carries no PEM chain"):
        _ = other.certificates


def test_wrongly_sized_fields_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="mrenclave must be 32 bytes"):
        SgxReportBody(
            cpusvn=bytes(16),
            miscselect=0,
            attributes=bytes(16),
            mrenclave=bytes(31),
            mrsigner=bytes(32),
            config_id=bytes(64),
            isvprodid=0,
            isvsvn=0,
            config_svn=0,
            isv_family_id=bytes(16),
            report_data=bytes(64),
        )


def _parse_fully(data: bytes) -> None:
    """Parse and touch everything lazily parsed; only QuoteParseError may escape."""
    try:
        q = parse_sgx_quote(data)
    except QuoteParseError:
        return
    assert q.to_bytes() == data
    with contextlib.suppress(QuoteParseError):
        _ = q.signature.certificates


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_quote_parse_error(data: bytes) -> None:
    _parse_fully(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200))
def test_arbitrary_signature_data_only_raises_quote_parse_error(tail: bytes) -> None:
    """A consistent length prefix drives the parser into the signature data itself."""
    _parse_fully(_SIM_QUOTE[:SIGNED_SIZE] + struct.pack("<I", len(tail)) + tail)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4599), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_real_quote_only_raises_quote_parse_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(REAL_SGX.read_bytes())
    for offset, value in edits:
        data[offset] = value
    _parse_fully(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 4599))
def test_every_truncation_of_a_real_quote_is_refused(length: int) -> None:
    with pytest.raises(QuoteParseError):
        parse_sgx_quote(REAL_SGX.read_bytes()[:length])
