"""TdxPolicy: every field accepts what it pins and rejects the rest with an exact
Mismatch; malformed policies raise PolicyError naming `tdx.<field>`."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from blindinfer.attestation.intel.tdx_policy import MaskedBytes, TdxPolicy
from blindinfer.attestation.intel.tdx_quote import TdReportBody, parse_tdx_quote
from blindinfer.errors import Mismatch, PolicyError
from support.vectors import VECTORS

REAL_V4 = VECTORS / "files" / "phala-dcap-qvl" / "sample_tdx_quote"

MEASUREMENTS = (
    "mrtd",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "mrconfigid",
    "mrowner",
    "mrownerconfig",
    "mrseam",
)
SEPT_VE_DISABLE = (1 << 28).to_bytes(8, "little")


def _m(i: int) -> bytes:
    return bytes([i]) * 48


BODY = TdReportBody(
    tee_tcb_svn=bytes([6, 1, 3]) + bytes(13),
    mrseam=_m(0x10),
    mrsignerseam=bytes(48),
    seam_attributes=bytes(8),
    td_attributes=SEPT_VE_DISABLE,
    xfam=bytes.fromhex("e702060000000000"),
    mrtd=_m(0x01),
    mrconfigid=_m(0x02),
    mrowner=_m(0x03),
    mrownerconfig=_m(0x04),
    rtmr0=_m(0x05),
    rtmr1=_m(0x06),
    rtmr2=_m(0x07),
    rtmr3=_m(0x08),
    report_data=bytes(64),
)
PIN = {"mrtd": _m(0x01).hex()}


def _policy(**fields: Any) -> TdxPolicy:
    return TdxPolicy.from_dict({**PIN, **fields})


def test_minimal_policy_accepts_matching_body() -> None:
    policy = _policy()
    assert policy.validate(BODY, "UpToDate", ()) == []
    assert policy.tcb_statuses == frozenset({"UpToDate"})
    assert policy.accepted_advisories == frozenset()


@pytest.mark.parametrize("name", MEASUREMENTS)
def test_each_measurement_accepts_any_listed_value_and_rejects_others(name: str) -> None:
    got: bytes = getattr(BODY, name)
    other = bytes([0xEE]) * 48
    accept = _policy(**{name: [other.hex(), got.hex()]})
    assert accept.validate(BODY, "UpToDate", ()) == []
    reject = _policy(**{name: [other.hex()]})
    assert reject.validate(BODY, "UpToDate", ()) == [
        Mismatch(f"tdx.{name}", other.hex(), got.hex())
    ]
    two = bytes([0xDD]) * 48
    reject_two = _policy(**{name: [other.hex(), two.hex()]})
    assert reject_two.validate(BODY, "UpToDate", ()) == [
        Mismatch(f"tdx.{name}", f"{other.hex()} or {two.hex()}", got.hex())
    ]


def test_a_single_string_is_a_one_value_list() -> None:
    policy = TdxPolicy.from_dict({**PIN, "rtmr3": _m(0x08).hex()})
    assert policy.rtmr3 == (_m(0x08),)
    assert policy.validate(BODY, "UpToDate", ()) == []


def test_debug_td_is_always_refused() -> None:
    debug = dataclasses.replace(BODY, td_attributes=bytes([1]) + SEPT_VE_DISABLE[1:])
    assert _policy().validate(debug, "UpToDate", ()) == [
        Mismatch("tdx.debug", "a production TD (DEBUG attribute clear)", "DEBUG set")
    ]


def test_td_attributes_masked() -> None:
    ok = _policy(td_attributes={"value": SEPT_VE_DISABLE.hex(), "mask": "ffffffffffffffff"})
    assert ok.validate(BODY, "UpToDate", ()) == []
    # Default mask is all ones.
    exact = _policy(td_attributes={"value": "0000000000000000"})
    assert exact.td_attributes == MaskedBytes(bytes(8), b"\xff" * 8)
    assert exact.validate(BODY, "UpToDate", ()) == [
        Mismatch(
            "tdx.td_attributes",
            "0000000000000000 under mask ffffffffffffffff",
            SEPT_VE_DISABLE.hex(),
        )
    ]
    # Bits outside the mask are ignored.
    loose = _policy(td_attributes={"value": "0000000000000000", "mask": "ffffffefffffffff"})
    assert loose.validate(BODY, "UpToDate", ()) == []


def test_xfam_masked() -> None:
    ok = _policy(xfam={"value": "0300000000000000", "mask": "0300000000000000"})
    assert ok.validate(BODY, "UpToDate", ()) == []
    bad = _policy(xfam={"value": "e700000000000000"})
    assert bad.validate(BODY, "UpToDate", ()) == [
        Mismatch("tdx.xfam", "e700000000000000 under mask ffffffffffffffff", "e702060000000000")
    ]


def test_min_tee_tcb_svn_is_bytewise() -> None:
    got = BODY.tee_tcb_svn.hex()
    assert _policy(min_tee_tcb_svn=got).validate(BODY, "UpToDate", ()) == []
    lower = (bytes([5, 1, 3]) + bytes(13)).hex()
    assert _policy(min_tee_tcb_svn=lower).validate(BODY, "UpToDate", ()) == []
    # One component higher than the evidence fails, even if another is lower.
    higher = (bytes([5, 2, 3]) + bytes(13)).hex()
    assert _policy(min_tee_tcb_svn=higher).validate(BODY, "UpToDate", ()) == [
        Mismatch("tdx.tee_tcb_svn", f">= {higher} (every byte)", got)
    ]


def test_tcb_statuses_default_and_explicit() -> None:
    assert _policy().validate(BODY, "OutOfDate", ()) == [
        Mismatch("tdx.tcb_status", "UpToDate", "OutOfDate")
    ]
    wide = _policy(tcb_statuses=["UpToDate", "SWHardeningNeeded"])
    assert wide.validate(BODY, "SWHardeningNeeded", ()) == []
    assert wide.validate(BODY, "OutOfDate", ()) == [
        Mismatch("tdx.tcb_status", "SWHardeningNeeded or UpToDate", "OutOfDate")
    ]


def test_advisories() -> None:
    ids = ("INTEL-SA-00960", "INTEL-SA-00982")
    assert _policy().validate(BODY, "UpToDate", ids) == [
        Mismatch("tdx.advisory_ids", "only accepted ones (none)", "INTEL-SA-00960, INTEL-SA-00982")
    ]
    some = _policy(accepted_advisories=["INTEL-SA-00960"])
    assert some.validate(BODY, "UpToDate", ids) == [
        Mismatch("tdx.advisory_ids", "only accepted ones (INTEL-SA-00960)", "INTEL-SA-00982")
    ]
    assert _policy(accepted_advisories=list(ids)).validate(BODY, "UpToDate", ids) == []


def test_every_failure_is_reported_at_once() -> None:
    debug = dataclasses.replace(BODY, td_attributes=bytes([1]) + bytes(7))
    policy = TdxPolicy.from_dict({"mrtd": _m(0xAA).hex(), "rtmr1": _m(0xBB).hex()})
    fields = [m.field for m in policy.validate(debug, "OutOfDate", ("INTEL-SA-1",))]
    assert fields == [
        "tdx.mrtd",
        "tdx.rtmr1",
        "tdx.debug",
        "tdx.td_attributes",
        "tdx.tcb_status",
        "tdx.advisory_ids",
    ]


@pytest.mark.parametrize(
    ("table", "phrase"),
    [
        ({}, r"must pin tdx\.mrtd \(add mrtd = "),
        ({"mrowner": _m(1).hex(), "mrseam": _m(1).hex()}, r"must pin tdx\.mrtd"),
        ({"mrtd": "00" * 48}, "tdx.mrtd: an all-zero value identifies no code"),
        ({**PIN, "allow_debug": True}, "tdx.allow_debug = true is not supported"),
        ({**PIN, "allow_debug": "no"}, "tdx.allow_debug is true or false"),
        ({**PIN, "mrtd": "00" * 32}, "tdx.mrtd values are 48 bytes"),
        ({**PIN, "rtmr2": "zz"}, "tdx.rtmr2: 'zz' is not hex"),
        ({**PIN, "mrseam": 5}, "tdx.mrseam values are hex strings"),
        ({**PIN, "rtmr0": []}, "tdx.rtmr0 is an empty list"),
        ({**PIN, "td_attributes": "00"}, "tdx.td_attributes values are 8 bytes"),
        ({**PIN, "td_attributes": 5}, "tdx.td_attributes must be a hex string"),
        ({**PIN, "td_attributes": {"mask": "ff" * 8}}, "tdx.td_attributes needs a value"),
        ({**PIN, "td_attributes": {"value": "00" * 4}}, "tdx.td_attributes.value values are 8"),
        ({**PIN, "xfam": {"value": "00" * 8, "mask": "ff"}}, "tdx.xfam.mask values are 8 bytes"),
        ({**PIN, "xfam": {"value": "00" * 8, "bits": 1}}, "unknown field.*tdx.xfam"),
        (
            {**PIN, "td_attributes": {"value": "0100000000000000"}},
            "tdx.td_attributes requires the DEBUG bit",
        ),
        ({**PIN, "min_tee_tcb_svn": "0601"}, "tdx.min_tee_tcb_svn values are 16 bytes"),
        ({**PIN, "tcb_statuses": ["Fine"]}, "tdx.tcb_statuses must be a non-empty subset"),
        ({**PIN, "tcb_statuses": []}, "tdx.tcb_statuses must be a non-empty subset"),
        ({**PIN, "tcb_statuses": [1]}, "tdx.tcb_statuses values are strings"),
        ({**PIN, "accepted_advisories": [None]}, "tdx.accepted_advisories values are strings"),
        ({**PIN, "mr_td": "00"}, r"unknown field\(s\) in tdx: \['mr_td'\]"),
    ],
)
def test_policy_errors(table: dict[str, Any], phrase: str) -> None:
    with pytest.raises(PolicyError, match=phrase):
        TdxPolicy.from_dict(table)


def test_debug_bit_outside_the_mask_is_not_a_debug_requirement() -> None:
    policy = _policy(td_attributes={"value": "0100000000000000", "mask": "fe00000000000000"})
    assert policy.validate(BODY, "UpToDate", ()) == []


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(PolicyError, match=r"tdx\.rtmr1 values are 48 bytes"):
        TdxPolicy(mrtd=(_m(1),), rtmr1=(bytes(3),))
    with pytest.raises(PolicyError, match=r"tdx\.xfam value and mask are 8 bytes"):
        TdxPolicy(mrtd=(_m(1),), xfam=MaskedBytes(bytes(8), bytes(4)))


def test_real_v4_quote_against_a_pinned_policy() -> None:
    body = parse_tdx_quote(REAL_V4.read_bytes()).body
    policy = TdxPolicy.from_dict(
        {
            "mrtd": body.mrtd.hex(),
            "rtmr0": body.rtmr0.hex(),
            "td_attributes": {"value": "0000001000000000"},
            "xfam": {"value": "e702060000000000"},
            "min_tee_tcb_svn": "06010300000000000000000000000000",
        }
    )
    assert policy.validate(body, "UpToDate", ()) == []
    stricter = dataclasses.replace(policy, min_tee_tcb_svn=bytes([7]) + bytes(15))
    assert stricter.validate(body, "UpToDate", ()) == [
        Mismatch(
            "tdx.tee_tcb_svn",
            ">= 07000000000000000000000000000000 (every byte)",
            "06010300000000000000000000000000",
        )
    ]
