"""Writes the policy that a verified server's evidence would satisfy, for a human to review."""

from __future__ import annotations

from blindinfer.attestation.report import VerifiedAttestation

# evidence kind -> (policy section, claims pinned as lists of allowed hex values)
_PINNED = {
    "intel-sgx": ("sgx", ("mrenclave", "mrsigner")),
    "intel-tdx": ("tdx", ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid")),
    "amd-snp": ("snp", ("measurement", "host_data")),
}


def suggested_policy(report: VerifiedAttestation, source: str) -> str:
    section, pinned = _PINNED[report.kind]
    lines = [
        f"# blindinfer policy suggested from the evidence of {source}",
        "# Review every value against what you built and measured yourself before trusting it:",
        "# these are the values the server REPORTED.",
    ]
    if report.simulation:
        lines += [
            "# WARNING: SIMULATION server: this policy only works with simulation=True and",
            "# protects nothing.",
        ]
    lines.append(f"[{section}]")
    lines += [f'{name} = ["{report.claims[name]}"]' for name in pinned]
    if report.kind == "intel-sgx":
        lines += [f"isvprodid = [{report.isvprodid}]", f"min_isvsvn = {report.isvsvn}"]
    if report.kind in ("intel-sgx", "intel-tdx"):
        advisories = ", ".join(f'"{a}"' for a in report.advisory_ids)
        lines += [
            f'tcb_statuses = ["{report.tcb_status}"]',
            f"accepted_advisories = [{advisories}]",
        ]
    lines.append("allow_debug = false")
    return "\n".join(lines) + "\n"
