"""parse_snp_report: exact fields of two real SEV-SNP reports, byte-exact round trips,
version-dependent reserved bytes, and no exception other than QuoteParseError for any
input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.attestation.snp.report import (
    REPORT_SIZE,
    SIGNED_SIZE,
    GuestPolicy,
    SnpReport,
    TcbVersion,
    parse_snp_report,
    product_from_cpuid,
)
from blindinfer.errors import QuoteParseError
from support.vectors import VECTORS

GOSEV_REPORT = VECTORS / "files" / "go-sev-guest" / "attestation.bin"
TRUSTEE_REPORT = VECTORS / "files" / "trustee" / "test-report.bin"


@pytest.fixture(scope="module")
def gosev() -> bytes:
    return GOSEV_REPORT.read_bytes()


@pytest.fixture(scope="module")
def trustee() -> bytes:
    return TRUSTEE_REPORT.read_bytes()


def _set(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def test_go_sev_guest_report_fields(gosev: bytes) -> None:
    report = parse_snp_report(gosev)
    assert report.version == 2
    assert report.guest_svn == 0
    assert report.policy == 0xB0000
    assert isinstance(report.policy, GuestPolicy)
    assert report.policy.debug_allowed
    assert report.policy.smt_allowed
    assert not report.policy.migrate_ma
    assert not report.policy.single_socket
    assert (report.policy.abi_major, report.policy.abi_minor) == (0, 0)
    assert report.family_id == bytes(16)
    assert report.image_id == bytes(16)
    assert report.vmpl == 0
    assert report.signature_algo == 1
    assert report.current_tcb.raw == 0x4405000000000002
    tcb = report.reported_tcb
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode, tcb.fmc) == (2, 0, 5, 68, None)
    assert report.committed_tcb == report.launch_tcb == report.reported_tcb
    assert report.platform_info == 1
    assert (report.author_key_en, report.mask_chip_key, report.signing_key) == (False, False, 0)
    assert report.report_data == bytes([1, 2, 3, 4, 5]) + bytes(59)
    assert report.measurement.hex() == (
        "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
        "6bdf8a9ece31a5a608eb0cf2e4872b01"
    )
    assert report.host_data == bytes(32)
    assert report.id_key_digest == report.author_key_digest == bytes(48)
    assert report.report_id.hex() == (
        "8edc638e1857c555d21f6b11bda3c8b1b5a09dba4852b4c8ee7aa2f16f22cc0a"
    )
    assert report.report_id_ma == b"\xff" * 32
    assert report.chip_id.hex().startswith("3ac3fe21e13fb0990eb28a802e3fb6a2")
    assert (report.current_major, report.current_minor, report.current_build) == (1, 49, 3)
    assert (report.committed_major, report.committed_minor, report.committed_build) == (1, 49, 3)
    assert report.cpuid_product is None  # version 2 has no CPUID bytes
    assert report.signature_r[48:] == report.signature_s[48:] == bytes(24)


def test_trustee_report_fields(trustee: bytes) -> None:
    report = parse_snp_report(trustee)
    assert report.version == 2
    assert report.guest_svn == 4
    assert report.policy == 0x3001F
    assert not report.policy.debug_allowed
    assert report.policy.smt_allowed
    assert (report.policy.abi_major, report.policy.abi_minor) == (0, 31)
    assert report.family_id == b"\x01" + bytes(15)
    assert report.image_id == b"\x02" + bytes(15)
    assert report.vmpl == 0
    tcb = report.reported_tcb
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (3, 0, 8, 115)
    assert report.reported_tcb.raw == 0x7308000000000003
    assert report.signing_key == 0
    assert report.measurement.hex() == (
        "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c"
        "23500644e0e692e6be917f9050d3d38c"
    )
    assert report.report_data.hex().startswith("ec6c52d7533cc2c4f45b")
    assert report.chip_id.hex().startswith("c38427a30d4c7af9d96f7a15b9726982")
    assert (report.current_major, report.current_minor, report.current_build) == (1, 52, 4)


@pytest.mark.parametrize("name", ["gosev", "trustee"])
def test_round_trip_is_byte_exact(name: str, request: pytest.FixtureRequest) -> None:
    raw: bytes = request.getfixturevalue(name)
    report = parse_snp_report(raw)
    assert report.to_bytes() == raw
    assert report.signed_bytes == raw[:SIGNED_SIZE]
    assert len(raw) == REPORT_SIZE


def test_offset_skips_a_prefix(gosev: bytes) -> None:
    assert parse_snp_report(b"\xaa" * 16 + gosev, offset=16).to_bytes() == gosev
    with pytest.raises(QuoteParseError, match="1184 bytes"):
        parse_snp_report(gosev + b"\x00")
    with pytest.raises(QuoteParseError, match="1184 bytes"):
        parse_snp_report(gosev[:-1])
    with pytest.raises(QuoteParseError, match="offset"):
        parse_snp_report(gosev, offset=-1)


def test_non_bytes_raise_parse_error() -> None:
    with pytest.raises(QuoteParseError, match="bytes"):
        parse_snp_report("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_unsupported_versions_are_refused(gosev: bytes, version: int) -> None:
    with pytest.raises(QuoteParseError, match=f"report version {version} is not supported"):
        parse_snp_report(_set(gosev, 0, _u32(version)))


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0x04C, b"\x01", "reserved bytes at 0x04c"),
        (0x18B, b"\x01", "reserved bytes at 0x18b"),
        (0x19F, b"\x01", "reserved bytes at 0x18b"),
        (0x1EB, b"\x01", "reserved bytes at 0x1eb"),
        (0x1EF, b"\x01", "reserved bytes at 0x1ef"),
        (0x208, b"\x01", "0x208..0x29f"),
        (0x29F, b"\x01", "0x208..0x29f"),
        (0x330, b"\x01", "after the ECDSA signature"),
        (0x49F, b"\x01", "after the ECDSA signature"),
        (0x2A0 + 48, b"\x01", "signature_r is not a zero-extended"),
        (0x2E8 + 71, b"\x01", "signature_s is not a zero-extended"),
        (0x188, b"\x19", "cpuid_fam_id"),  # CPUID bytes only exist from version 3
        (0x1F8, b"\x01", "launch_mit_vector"),  # mitigation vectors only from version 5
        (0x200, b"\x01", "current_mit_vector"),
        (0x00A, b"\x09", "bit 17 is reserved and must be one"),  # policy 0x90000
        (0x00B, b"\x04", "reserved bits 63:26"),  # policy bit 26
        (0x048, b"\x20", "reserved bits 31:5"),
        (0x048, b"\x08", "SIGNING_KEY 2 is reserved"),
        (0x048, b"\x18", "SIGNING_KEY 6 is reserved"),
    ],
)
def test_reserved_regions_must_be_zero(
    gosev: bytes, offset: int, value: bytes, message: str
) -> None:
    with pytest.raises(QuoteParseError, match=message):
        parse_snp_report(_set(gosev, offset, value))


def test_version_3_reads_cpuid_and_picks_the_tcb_layout(gosev: bytes) -> None:
    milan = parse_snp_report(_set(_set(gosev, 0, _u32(3)), 0x188, b"\x19\x01\x01"))
    assert (milan.cpuid_fam_id, milan.cpuid_mod_id, milan.cpuid_step) == (0x19, 1, 1)
    assert milan.cpuid_product == "Milan"
    assert milan.reported_tcb.layout == "milan-genoa"
    turin = parse_snp_report(_set(_set(gosev, 0, _u32(3)), 0x188, b"\x1a\x02\x00"))
    assert turin.cpuid_product == "Turin"
    assert turin.reported_tcb.layout == "turin"
    # 0x4405000000000002 read as Turin: fmc=2 bootloader=0 tee=0 snp=0 microcode=0x44
    t = turin.reported_tcb
    assert (t.fmc, t.bootloader, t.tee, t.snp, t.microcode) == (2, 0, 0, 0, 0x44)


def test_version_4_still_reserves_the_mitigation_vectors(gosev: bytes) -> None:
    v4 = _set(gosev, 0, _u32(4))
    assert parse_snp_report(v4).version == 4
    with pytest.raises(QuoteParseError, match="launch_mit_vector"):
        parse_snp_report(_set(v4, 0x1F8, b"\x01"))


def test_version_5_reads_the_mitigation_vectors(gosev: bytes) -> None:
    v5 = _set(_set(_set(gosev, 0, _u32(5)), 0x1F8, b"\x03"), 0x200, b"\x07")
    report = parse_snp_report(v5)
    assert (report.launch_mit_vector, report.current_mit_vector) == (3, 7)
    assert report.to_bytes() == v5


def test_for_product_rereads_tcbs_without_changing_bytes(gosev: bytes) -> None:
    report = parse_snp_report(gosev)
    turin = report.for_product("Turin")
    assert turin.to_bytes() == gosev
    assert turin.reported_tcb.layout == "turin"
    assert report.for_product("Genoa").reported_tcb == report.reported_tcb


def test_tcb_layouts_compose_and_decompose() -> None:
    milan = TcbVersion.from_parts(bootloader=3, tee=0, snp=8, microcode=115)
    assert milan.raw == 0x7308000000000003
    assert "bootloader=3" in milan.describe()
    turin = TcbVersion.from_parts(bootloader=1, tee=2, snp=3, microcode=4, fmc=5, layout="turin")
    assert turin.raw == 0x0400000003020105
    assert (turin.fmc, turin.bootloader, turin.tee, turin.snp, turin.microcode) == (5, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="FMC"):
        TcbVersion.from_parts(bootloader=0, tee=0, snp=0, microcode=0, fmc=1)
    with pytest.raises(ValueError, match="64-bit"):
        TcbVersion(1 << 64)


@pytest.mark.parametrize(
    ("family", "model", "product"),
    [
        (0x19, 0x01, "Milan"),
        (0x19, 0x11, "Genoa"),
        (0x19, 0xA0, "Genoa"),
        (0x1A, 0x02, "Turin"),
        (0x19, 0x20, None),
        (0x17, 0x31, None),
        (0x1A, 0x50, None),
    ],
)
def test_product_from_cpuid(family: int, model: int, product: str | None) -> None:
    assert product_from_cpuid(family, model) == product


def test_construction_checks_sizes(gosev: bytes) -> None:
    report = parse_snp_report(gosev)
    fields = {name: getattr(report, name) for name in SnpReport.__dataclass_fields__}
    with pytest.raises(ValueError, match="measurement must be 48 bytes"):
        SnpReport(**{**fields, "measurement": b"\x00" * 47})
    with pytest.raises(ValueError, match="vmpl must be an unsigned 32-bit"):
        SnpReport(**{**fields, "vmpl": 1 << 32})
    rebuilt = SnpReport(**{**fields, "policy": 0x30000})
    assert isinstance(rebuilt.policy, GuestPolicy)
    assert not rebuilt.policy.debug_allowed


@given(st.binary(max_size=2 * REPORT_SIZE))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_raise_only_parse_errors(data: bytes) -> None:
    with contextlib.suppress(QuoteParseError):
        report = parse_snp_report(data)
        assert report.to_bytes() == data


_REAL = GOSEV_REPORT.read_bytes() if GOSEV_REPORT.is_file() else bytes(REPORT_SIZE)


@given(
    st.lists(
        st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    st.sampled_from([2, 3, 4, 5, 0, 7]),
)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_real_reports_parse_or_raise_parse_error(
    edits: list[tuple[int, int]], version: int
) -> None:
    raw = bytearray(_set(_REAL, 0, _u32(version)))
    for offset, value in edits:
        raw[offset] = value
    try:
        report = parse_snp_report(bytes(raw))
    except QuoteParseError:
        return
    assert report.to_bytes() == bytes(raw)
    assert 2 <= report.version <= 5
