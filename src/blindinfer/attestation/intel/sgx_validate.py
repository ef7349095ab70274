"""Compares authentic evidence with a policy; reports every failing field at once."""

from __future__ import annotations

from blindinfer.attestation.intel.sgx_policy import SgxPolicy
from blindinfer.attestation.intel.sgx_quote import SgxReportBody
from blindinfer.errors import Mismatch

_DEBUG_FLAG = 0x02


def _any_of(values: tuple[bytes, ...]) -> str:
    return " or ".join(v.hex() for v in values)


def validate_sgx(
    body: SgxReportBody, tcb_status: str, advisory_ids: tuple[str, ...], policy: SgxPolicy
) -> list[Mismatch]:
    found: list[Mismatch] = []
    if policy.mrenclave and body.mrenclave not in policy.mrenclave:
        found.append(Mismatch("mrenclave", _any_of(policy.mrenclave), body.mrenclave.hex()))
    if policy.mrsigner and body.mrsigner not in policy.mrsigner:
        found.append(Mismatch("mrsigner", _any_of(policy.mrsigner), body.mrsigner.hex()))
    if policy.isvprodid and body.isvprodid not in policy.isvprodid:
        expected = " or ".join(str(v) for v in policy.isvprodid)
        found.append(Mismatch("isvprodid", expected, str(body.isvprodid)))
    if policy.min_isvsvn is not None and body.isvsvn < policy.min_isvsvn:
        found.append(Mismatch("isvsvn", f">= {policy.min_isvsvn}", str(body.isvsvn)))
    if body.attributes[0] & _DEBUG_FLAG and not policy.allow_debug:
        found.append(Mismatch("debug", "a production enclave (DEBUG attribute clear)", "DEBUG set"))
    if policy.attributes is not None and not policy.attributes.matches(body.attributes):
        found.append(Mismatch("attributes", policy.attributes.describe(), body.attributes.hex()))
    miscselect = body.miscselect.to_bytes(4, "little")
    if policy.miscselect is not None and not policy.miscselect.matches(miscselect):
        found.append(Mismatch("miscselect", policy.miscselect.describe(), miscselect.hex()))
    if tcb_status not in policy.tcb_statuses:
        found.append(Mismatch("tcb_status", " or ".join(sorted(policy.tcb_statuses)), tcb_status))
    unaccepted = [a for a in advisory_ids if a not in policy.accepted_advisories]
    if unaccepted:
        accepted = ", ".join(sorted(policy.accepted_advisories)) or "none"
        found.append(
            Mismatch("advisory_ids", f"only accepted ones ({accepted})", ", ".join(unaccepted))
        )
    return found
