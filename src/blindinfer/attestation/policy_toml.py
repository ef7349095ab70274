"""Writes the policy that a verified server's evidence would satisfy, for a human to review."""

from __future__ import annotations

from blindinfer.attestation.report import VerifiedAttestation


def suggested_policy(report: VerifiedAttestation, source: str) -> str:
    warning = (
        "# WARNING: SIMULATION server: this policy only works with simulation=True and\n"
        "# protects nothing.\n"
        if report.simulation
        else ""
    )
    advisories = ", ".join(f'"{a}"' for a in report.advisory_ids)
    return (
        f"# blindinfer policy suggested from the evidence of {source}\n"
        "# Review every value against what you built and measured yourself before trusting it:\n"
        "# these are the values the server REPORTED.\n"
        f"{warning}"
        "[sgx]\n"
        f'mrenclave = ["{report.mrenclave.hex()}"]\n'
        f'mrsigner = ["{report.mrsigner.hex()}"]\n'
        f"isvprodid = [{report.isvprodid}]\n"
        f"min_isvsvn = {report.isvsvn}\n"
        "allow_debug = false\n"
        f'tcb_statuses = ["{report.tcb_status}"]\n'
        f"accepted_advisories = [{advisories}]\n"
    )
