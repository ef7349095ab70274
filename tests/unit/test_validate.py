"""validate_sgx: each policy field on a real (simulated) report body, with the exact
Mismatch and its exact rendered line; all failing fields reported together."""

from __future__ import annotations

import dataclasses

import pytest

from blindinfer.attestation.intel.sgx_policy import MaskedValue, SgxPolicy
from blindinfer.attestation.intel.sgx_quote import SgxReportBody, parse_sgx_quote
from blindinfer.attestation.intel.sgx_validate import validate_sgx
from blindinfer.errors import Mismatch, PolicyMismatchError
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER, SimulationPlatform

MRE = bytes(range(32))
OTHER_MRE = b"\x11" * 32
OTHER_MRS = b"\x22" * 32
REPORT_DATA = bytes(range(100, 164))
ATTRIBUTES_HEX = "0500000000000000" + "0300000000000000"  # INIT|MODE64BIT, XFRM x87|SSE


def _body(*, debug: bool = False) -> SgxReportBody:
    platform = SimulationPlatform(MRE, isvprodid=7, isvsvn=3, debug=debug)
    return parse_sgx_quote(platform.evidence(REPORT_DATA).quote).body


BODY = _body()
DEBUG_BODY = _body(debug=True)
BASE = SgxPolicy(mrenclave=(MRE,))


def test_the_simulated_body_has_the_expected_fields() -> None:
    assert BODY.mrenclave == MRE
    assert BODY.mrsigner == SIMULATION_MRSIGNER
    assert (BODY.isvprodid, BODY.isvsvn, BODY.miscselect) == (7, 3, 0)
    assert BODY.attributes.hex() == ATTRIBUTES_HEX
    assert BODY.report_data == REPORT_DATA
    assert not BODY.debug
    assert DEBUG_BODY.debug
    assert DEBUG_BODY.attributes.hex() == "0700000000000000" + "0300000000000000"


def test_a_matching_policy_gives_no_mismatch() -> None:
    policy = SgxPolicy(
        mrenclave=(MRE,),
        mrsigner=(SIMULATION_MRSIGNER,),
        isvprodid=(7,),
        min_isvsvn=3,
        attributes=MaskedValue(bytes.fromhex(ATTRIBUTES_HEX), b"\xff" * 16),
        miscselect=MaskedValue(bytes(4), b"\xff" * 4),
    )
    assert validate_sgx(BODY, "UpToDate", (), policy) == []


# (id, policy, tcb_status, advisories, body, expected Mismatch, expected str line)
CASES = [
    (
        "mrenclave",
        SgxPolicy(mrenclave=(OTHER_MRE,)),
        "UpToDate",
        (),
        BODY,
        Mismatch("mrenclave", "11" * 32, MRE.hex()),
        f"mrenclave: expected {'11' * 32}, got {MRE.hex()}",
    ),
    (
        "mrsigner",
        SgxPolicy(mrenclave=(MRE,), mrsigner=(OTHER_MRS,)),
        "UpToDate",
        (),
        BODY,
        Mismatch("mrsigner", "22" * 32, SIMULATION_MRSIGNER.hex()),
        f"mrsigner: expected {'22' * 32}, got {SIMULATION_MRSIGNER.hex()}",
    ),
    (
        "isvprodid",
        SgxPolicy(mrenclave=(MRE,), isvprodid=(1, 2)),
        "UpToDate",
        (),
        BODY,
        Mismatch("isvprodid", "1 or 2", "7"),
        "isvprodid: expected 1 or 2, got 7",
    ),
    (
        "isvsvn",
        SgxPolicy(mrenclave=(MRE,), min_isvsvn=4),
        "UpToDate",
        (),
        BODY,
        Mismatch("isvsvn", ">= 4", "3"),
        "isvsvn: expected >= 4, got 3",
    ),
    (
        "attributes",
        SgxPolicy(mrenclave=(MRE,), attributes=MaskedValue(bytes(16), b"\xff" + bytes(15))),
        "UpToDate",
        (),
        BODY,
        Mismatch("attributes", f"{'00' * 16} under mask ff{'00' * 15}", ATTRIBUTES_HEX),
        f"attributes: expected {'00' * 16} under mask ff{'00' * 15}, got {ATTRIBUTES_HEX}",
    ),
    (
        "miscselect",
        SgxPolicy(mrenclave=(MRE,), miscselect=MaskedValue(bytes([1, 0, 0, 0]), b"\xff" * 4)),
        "UpToDate",
        (),
        BODY,
        Mismatch("miscselect", "01000000 under mask ffffffff", "00000000"),
        "miscselect: expected 01000000 under mask ffffffff, got 00000000",
    ),
    (
        "tcb_status",
        BASE,
        "OutOfDate",
        (),
        BODY,
        Mismatch("tcb_status", "UpToDate", "OutOfDate"),
        "tcb_status: expected UpToDate, got OutOfDate",
    ),
    (
        "tcb_status-several",
        SgxPolicy(mrenclave=(MRE,), tcb_statuses=frozenset({"UpToDate", "SWHardeningNeeded"})),
        "ConfigurationNeeded",
        (),
        BODY,
        Mismatch("tcb_status", "SWHardeningNeeded or UpToDate", "ConfigurationNeeded"),
        "tcb_status: expected SWHardeningNeeded or UpToDate, got ConfigurationNeeded",
    ),
    (
        "advisory_ids-none-accepted",
        BASE,
        "UpToDate",
        ("INTEL-SA-00334", "INTEL-SA-00615"),
        BODY,
        Mismatch("advisory_ids", "only accepted ones (none)", "INTEL-SA-00334, INTEL-SA-00615"),
        "advisory_ids: expected only accepted ones (none), got INTEL-SA-00334, INTEL-SA-00615",
    ),
    (
        "advisory_ids-some-accepted",
        SgxPolicy(mrenclave=(MRE,), accepted_advisories=frozenset({"INTEL-SA-00334", "A-1"})),
        "UpToDate",
        ("INTEL-SA-00334", "INTEL-SA-00615"),
        BODY,
        Mismatch("advisory_ids", "only accepted ones (A-1, INTEL-SA-00334)", "INTEL-SA-00615"),
        "advisory_ids: expected only accepted ones (A-1, INTEL-SA-00334), got INTEL-SA-00615",
    ),
    (
        "debug",
        BASE,
        "UpToDate",
        (),
        DEBUG_BODY,
        Mismatch("debug", "a production enclave (DEBUG attribute clear)", "DEBUG set"),
        "debug: expected a production enclave (DEBUG attribute clear), got DEBUG set",
    ),
]


@pytest.mark.parametrize(
    ("policy", "status", "advisories", "body", "mismatch", "line"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_one_failing_field(
    policy: SgxPolicy,
    status: str,
    advisories: tuple[str, ...],
    body: SgxReportBody,
    mismatch: Mismatch,
    line: str,
) -> None:
    found = validate_sgx(body, status, advisories, policy)
    assert found == [mismatch]
    assert str(found[0]) == line
    assert str(PolicyMismatchError(found)) == f"evidence does not satisfy the policy:\n  - {line}"


def test_every_failing_field_is_reported_together_in_order() -> None:
    policy = SgxPolicy(
        mrenclave=(OTHER_MRE,),
        mrsigner=(OTHER_MRS,),
        isvprodid=(1,),
        min_isvsvn=9,
        attributes=MaskedValue(bytes(16), b"\xff" * 16),
        miscselect=MaskedValue(b"\xff" * 4, b"\x01\x00\x00\x00"),
    )
    found = validate_sgx(DEBUG_BODY, "OutOfDate", ("INTEL-SA-00001",), policy)
    assert [m.field for m in found] == [
        "mrenclave",
        "mrsigner",
        "isvprodid",
        "isvsvn",
        "debug",
        "attributes",
        "miscselect",
        "tcb_status",
        "advisory_ids",
    ]
    assert found[2] == Mismatch("isvprodid", "1", "7")
    assert found[3] == Mismatch("isvsvn", ">= 9", "3")
    assert found[6] == Mismatch("miscselect", "ffffffff under mask 01000000", "00000000")
    error = PolicyMismatchError(found)
    assert error.mismatches == tuple(found)
    assert str(error).splitlines()[1:] == [f"  - {m}" for m in found]


@pytest.mark.parametrize("position", [0, 1, 2])
def test_multiple_allowed_values_accept_any_of_them(position: int) -> None:
    mrenclaves = [OTHER_MRE, b"\x33" * 32, b"\x44" * 32]
    mrenclaves[position] = MRE
    mrsigners = [OTHER_MRS, b"\x55" * 32, b"\x66" * 32]
    mrsigners[position] = SIMULATION_MRSIGNER
    prodids = [100, 200, 300]
    prodids[position] = 7
    policy = SgxPolicy(
        mrenclave=tuple(mrenclaves),
        mrsigner=tuple(mrsigners),
        isvprodid=tuple(prodids),
        tcb_statuses=frozenset({"UpToDate", "OutOfDate", "SWHardeningNeeded"}),
        accepted_advisories=frozenset({"A", "B", "C"}),
    )
    status = ["UpToDate", "OutOfDate", "SWHardeningNeeded"][position]
    assert validate_sgx(BODY, status, ("A", "B", "C")[position:], policy) == []


def test_multiple_allowed_values_listed_in_the_mismatch() -> None:
    policy = SgxPolicy(mrenclave=(OTHER_MRE, b"\x33" * 32))
    assert validate_sgx(BODY, "UpToDate", (), policy) == [
        Mismatch("mrenclave", f"{'11' * 32} or {'33' * 32}", MRE.hex())
    ]


def test_isvsvn_boundary() -> None:
    assert validate_sgx(BODY, "UpToDate", (), SgxPolicy(mrenclave=(MRE,), min_isvsvn=3)) == []
    assert validate_sgx(BODY, "UpToDate", (), SgxPolicy(mrenclave=(MRE,), min_isvsvn=0)) == []


def test_masks_ignore_bits_outside_them() -> None:
    # Ignore XFRM and every flag but DEBUG: the production body matches "DEBUG clear".
    attributes = MaskedValue(b"\xfd" + bytes(15), b"\x02" + bytes(15))
    miscselect = MaskedValue(b"\xff" * 4, bytes(4))
    policy = SgxPolicy(mrenclave=(MRE,), attributes=attributes, miscselect=miscselect)
    assert validate_sgx(BODY, "UpToDate", (), policy) == []
    assert validate_sgx(DEBUG_BODY, "UpToDate", (), policy) == [
        Mismatch("debug", "a production enclave (DEBUG attribute clear)", "DEBUG set"),
        Mismatch(
            "attributes", f"fd{'00' * 15} under mask 02{'00' * 15}", DEBUG_BODY.attributes.hex()
        ),
    ]


def test_mrsigner_only_policy_checks_mrsigner_not_mrenclave() -> None:
    policy = SgxPolicy(mrsigner=(SIMULATION_MRSIGNER,), isvprodid=(BODY.isvprodid,))
    other = dataclasses.replace(BODY, mrenclave=OTHER_MRE)
    assert validate_sgx(other, "UpToDate", (), policy) == []
    assert validate_sgx(dataclasses.replace(BODY, mrsigner=OTHER_MRS), "UpToDate", (), policy) == [
        Mismatch("mrsigner", SIMULATION_MRSIGNER.hex(), OTHER_MRS.hex())
    ]


def test_nonzero_miscselect_is_rendered_little_endian() -> None:
    body = dataclasses.replace(BODY, miscselect=0x04030201)
    policy = SgxPolicy(mrenclave=(MRE,), miscselect=MaskedValue(bytes(4), b"\xff" * 4))
    assert validate_sgx(body, "UpToDate", (), policy) == [
        Mismatch("miscselect", "00000000 under mask ffffffff", "01020304")
    ]
    matching = SgxPolicy(mrenclave=(MRE,), miscselect=MaskedValue(bytes([1, 2, 3, 4]), b"\xff" * 4))
    assert validate_sgx(body, "UpToDate", (), matching) == []
