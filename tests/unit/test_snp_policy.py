"""SnpPolicy: every field accepts and rejects with its exact Mismatch, the secure defaults
hold, and malformed policy tables raise PolicyError naming the snp.<field>."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from blindinfer.attestation.snp.policy import SnpPolicy, TcbMinimum
from blindinfer.attestation.snp.report import GuestPolicy, SnpReport, TcbVersion
from blindinfer.errors import Mismatch, PolicyError

MEASUREMENT = bytes(range(48))
HOST_DATA = b"\x22" * 32
ID_KEY = b"\x33" * 48
AUTHOR_KEY = b"\x44" * 48
FAMILY = b"\x01" + bytes(15)
IMAGE = b"\x02" + bytes(15)
TCB = TcbVersion.from_parts(bootloader=3, tee=1, snp=8, microcode=115)


def _report(**changes: Any) -> SnpReport:
    """A production-looking report (signature irrelevant: policy runs after verification)."""
    base = SnpReport(
        version=2,
        guest_svn=4,
        policy=GuestPolicy(0x30000),
        family_id=FAMILY,
        image_id=IMAGE,
        vmpl=0,
        signature_algo=1,
        current_tcb=TCB,
        platform_info=1,
        signer_info=0,
        report_data=bytes(64),
        measurement=MEASUREMENT,
        host_data=HOST_DATA,
        id_key_digest=ID_KEY,
        author_key_digest=AUTHOR_KEY,
        report_id=bytes(32),
        report_id_ma=b"\xff" * 32,
        reported_tcb=TCB,
        chip_id=b"\x42" * 64,
        committed_tcb=TCB,
        launch_tcb=TCB,
        signature_r=bytes(72),
        signature_s=bytes(72),
    )
    return dataclasses.replace(base, **changes)


def test_defaults_accept_a_production_guest() -> None:
    assert SnpPolicy().validate(_report()) == []
    assert SnpPolicy.from_dict({}) == SnpPolicy()


@pytest.mark.parametrize(
    ("name", "good", "size"),
    [
        ("measurement", MEASUREMENT, 48),
        ("host_data", HOST_DATA, 32),
        ("id_key_digest", ID_KEY, 48),
        ("author_key_digest", AUTHOR_KEY, 48),
        ("family_id", FAMILY, 16),
        ("image_id", IMAGE, 16),
    ],
)
def test_byte_fields_accept_any_listed_value(name: str, good: bytes, size: int) -> None:
    other = b"\xee" * size
    report = _report()
    assert SnpPolicy.from_dict({name: good.hex()}).validate(report) == []
    assert SnpPolicy.from_dict({name: [other.hex(), good.hex().upper()]}).validate(report) == []
    third = b"\xdd" * size
    refused = SnpPolicy.from_dict({name: [other.hex(), third.hex()]})
    assert refused.validate(report) == [
        Mismatch(f"snp.{name}", f"{other.hex()} or {third.hex()}", good.hex())
    ]


def test_debug_guest_is_always_refused() -> None:
    debug = _report(policy=GuestPolicy(0xB0000))
    expected = Mismatch(
        "snp.allow_debug",
        "a guest policy without DEBUG (bit 19 clear)",
        "DEBUG allowed (policy 0xb0000)",
    )
    assert SnpPolicy().validate(debug) == [expected]
    assert SnpPolicy.from_dict({"allow_debug": False}).validate(debug) == [expected]
    # As in [sgx] and [tdx]: a policy cannot accept a guest the host can debug.
    with pytest.raises(PolicyError, match=r"snp\.allow_debug = true is not supported"):
        SnpPolicy.from_dict({"allow_debug": True})
    with pytest.raises(PolicyError, match=r"snp\.allow_debug = true is not supported"):
        SnpPolicy(allow_debug=True)


def test_migration_agent_is_refused_unless_allowed() -> None:
    ma = _report(policy=GuestPolicy(0x70000))
    assert SnpPolicy().validate(ma) == [
        Mismatch(
            "snp.allow_migration_agent",
            "a guest policy without MIGRATE_MA (bit 18 clear)",
            "MIGRATE_MA allowed (policy 0x70000)",
        )
    ]
    assert SnpPolicy.from_dict({"allow_migration_agent": True}).validate(ma) == []


def test_smt_is_allowed_by_default_and_can_be_refused() -> None:
    smt = _report(policy=GuestPolicy(0x30000))
    no_smt = _report(policy=GuestPolicy(0x20000))
    assert SnpPolicy().validate(smt) == []
    strict = SnpPolicy.from_dict({"allow_smt": False})
    assert strict.validate(no_smt) == []
    assert strict.validate(smt) == [
        Mismatch(
            "snp.allow_smt",
            "a guest policy without SMT (bit 16 clear)",
            "SMT allowed (policy 0x30000)",
        )
    ]


@pytest.mark.parametrize(
    ("component", "have"), [("bootloader", 3), ("tee", 1), ("snp", 8), ("microcode", 115)]
)
def test_min_reported_tcb_each_component(component: str, have: int) -> None:
    report = _report()
    assert SnpPolicy.from_dict({"min_reported_tcb": {component: have}}).validate(report) == []
    assert SnpPolicy.from_dict({"min_reported_tcb": {component: 0}}).validate(report) == []
    policy = SnpPolicy.from_dict({"min_reported_tcb": {component: have + 1}})
    assert policy.validate(report) == [
        Mismatch(f"snp.min_reported_tcb.{component}", f">= {have + 1}", str(have))
    ]


def test_min_reported_tcb_reports_every_failing_component() -> None:
    policy = SnpPolicy.from_dict(
        {"min_reported_tcb": {"bootloader": 4, "tee": 1, "snp": 9, "microcode": 200}}
    )
    assert [m.field for m in policy.validate(_report())] == [
        "snp.min_reported_tcb.bootloader",
        "snp.min_reported_tcb.snp",
        "snp.min_reported_tcb.microcode",
    ]


def test_min_fmc_needs_a_turin_tcb() -> None:
    policy = SnpPolicy.from_dict({"min_reported_tcb": {"fmc": 1}})
    assert policy.validate(_report()) == [
        Mismatch("snp.min_reported_tcb.fmc", ">= 1", "absent (not a Turin TCB)")
    ]
    turin = TcbVersion.from_parts(bootloader=1, tee=1, snp=1, microcode=1, fmc=2, layout="turin")
    assert policy.validate(_report(reported_tcb=turin)) == []


def test_vmpl_defaults_to_zero_and_accepts_a_list() -> None:
    assert SnpPolicy().validate(_report(vmpl=1)) == [Mismatch("snp.vmpl", "0", "1")]
    assert SnpPolicy.from_dict({"vmpl": [0, 1]}).validate(_report(vmpl=1)) == []
    assert SnpPolicy.from_dict({"vmpl": 2}).validate(_report(vmpl=1)) == [
        Mismatch("snp.vmpl", "2", "1")
    ]


def test_report_versions() -> None:
    assert SnpPolicy().validate(_report(version=5)) == []
    policy = SnpPolicy.from_dict({"report_versions": [3, 5]})
    assert policy.validate(_report(version=5)) == []
    assert policy.validate(_report(version=2)) == [Mismatch("snp.report_versions", "3 or 5", "2")]


def test_guest_svn_min() -> None:
    assert SnpPolicy.from_dict({"guest_svn_min": 4}).validate(_report()) == []
    assert SnpPolicy.from_dict({"guest_svn_min": 5}).validate(_report()) == [
        Mismatch("snp.guest_svn_min", ">= 5", "4")
    ]


def test_every_failing_field_is_reported_at_once() -> None:
    report = _report(policy=GuestPolicy(0xF0000), vmpl=3, guest_svn=0)
    policy = SnpPolicy.from_dict(
        {"measurement": (b"\x01" * 48).hex(), "guest_svn_min": 1, "allow_smt": False}
    )
    assert [m.field for m in policy.validate(report)] == [
        "snp.measurement",
        "snp.allow_debug",
        "snp.allow_migration_agent",
        "snp.allow_smt",
        "snp.vmpl",
        "snp.guest_svn_min",
    ]


def test_direct_construction_is_checked() -> None:
    assert SnpPolicy(min_reported_tcb=TcbMinimum(snp=8)).validate(_report()) == []
    with pytest.raises(PolicyError, match=r"snp\.measurement values are 48 bytes"):
        SnpPolicy(measurement=(b"\x00" * 32,))
    with pytest.raises(PolicyError, match=r"snp\.min_reported_tcb\.tee"):
        TcbMinimum(tee=256)


@pytest.mark.parametrize(
    ("table", "names"),
    [
        ({"measurment": "00"}, "unknown field(s) in snp: ['measurment']"),
        ({"measurement": "00" * 47}, "snp.measurement values are 48 bytes"),
        ({"measurement": "zz" * 48}, "snp.measurement: "),
        ({"measurement": 12}, "snp.measurement values are hex strings"),
        ({"host_data": "00" * 48}, "snp.host_data values are 32 bytes"),
        ({"id_key_digest": ["00" * 48, "00"]}, "snp.id_key_digest values are 48 bytes"),
        ({"author_key_digest": "00" * 32}, "snp.author_key_digest values are 48 bytes"),
        ({"family_id": "00" * 32}, "snp.family_id values are 16 bytes"),
        ({"image_id": b"\x00" * 16}, "snp.image_id values are hex strings"),
        ({"allow_debug": "yes"}, "snp.allow_debug is true or false"),
        ({"allow_debug": True}, "snp.allow_debug = true is not supported"),
        ({"measurement": "00" * 48}, "snp.measurement: an all-zero value identifies no code"),
        ({"id_key_digest": "00" * 48}, "snp.id_key_digest: an all-zero value identifies no"),
        (
            {"author_key_digest": ["ab" * 48, "00" * 48]},
            "snp.author_key_digest: an all-zero value identifies no code",
        ),
        ({"allow_migration_agent": 1}, "snp.allow_migration_agent is true or false"),
        ({"allow_smt": None}, "snp.allow_smt is true or false"),
        ({"min_reported_tcb": 3}, "snp.min_reported_tcb must be a table"),
        ({"min_reported_tcb": {"ucode": 1}}, "unknown field(s) in snp.min_reported_tcb"),
        ({"min_reported_tcb": {"snp": "8"}}, "snp.min_reported_tcb.snp values are integers"),
        ({"min_reported_tcb": {"snp": 300}}, "snp.min_reported_tcb.snp is an integer in 0..255"),
        ({"min_reported_tcb": {"tee": True}}, "snp.min_reported_tcb.tee values are integers"),
        ({"vmpl": [0, 4]}, "snp.vmpl is a non-empty list of VMPLs"),
        ({"vmpl": []}, "snp.vmpl is a non-empty list of VMPLs"),
        ({"vmpl": ["0"]}, "snp.vmpl values are integers"),
        ({"report_versions": [1]}, "snp.report_versions values are report versions"),
        ({"report_versions": [2.0]}, "snp.report_versions values are integers"),
        ({"guest_svn_min": -1}, "snp.guest_svn_min is a 32-bit unsigned integer"),
        ({"guest_svn_min": 1 << 32}, "snp.guest_svn_min is a 32-bit unsigned integer"),
        ({"guest_svn_min": False}, "snp.guest_svn_min values are integers"),
    ],
)
def test_malformed_fields_raise_policy_error(table: dict[str, Any], names: str) -> None:
    with pytest.raises(PolicyError) as info:
        SnpPolicy.from_dict(table)
    assert names in str(info.value)


def test_from_dict_needs_a_table() -> None:
    with pytest.raises(PolicyError, match="snp must be a table"):
        SnpPolicy.from_dict(["measurement"])  # type: ignore[arg-type]
