"""Writes the policy that a verified server's evidence would satisfy, for a human to review.

Only what pins code is written as a setting: the measurements (never an all-zero register,
which identifies nothing) and, for TDX, the TD attributes and XFAM when they meet the
default rule. Whatever would weaken a default (a TCB status other than UpToDate, advisories,
TD attributes the default refuses, a guest that allows debugging or a migration agent, a
VMPL other than 0) is written only as a commented-out line under a WARNING: accepting it is a
decision that a human makes by editing the file, never one a server makes by reporting it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from blindinfer.attestation.intel.tdx_policy import default_td_attribute_violations
from blindinfer.attestation.report import Claim
from blindinfer.attestation.snp.report import GuestPolicy

# evidence kind -> (policy section, claims pinned as lists of allowed hex values)
_PINNED = {
    "intel-sgx": ("sgx", ("mrenclave", "mrsigner")),
    "intel-tdx": ("tdx", ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid")),
    "amd-snp": ("snp", ("measurement", "host_data", "id_key_digest", "author_key_digest")),
}


class ReportedEvidence(Protocol):
    """What the suggestion reads: a `VerifiedAttestation` or an offline `OfflineResult`."""

    @property
    def kind(self) -> str: ...
    @property
    def simulation(self) -> bool: ...
    @property
    def tcb_status(self) -> str: ...
    @property
    def advisory_ids(self) -> tuple[str, ...]: ...
    @property
    def claims(self) -> Mapping[str, Claim]: ...


@dataclass(slots=True)
class Suggestion:
    """The policy text, and one line per thing it left commented out as weaker than the
    default (for the command line to repeat on stderr, where `> policy.toml` still shows it)."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def warn(self, summary: str, *commented: str) -> None:
        self.warnings.append(summary)
        self.lines += [f"# WARNING: {summary}", *(f"# {line}" for line in commented)]


def suggested_policy(report: ReportedEvidence, source: str) -> str:
    return suggest(report, source).text


def suggest(report: ReportedEvidence, source: str) -> Suggestion:
    section, pinned = _PINNED[report.kind]
    out = Suggestion(
        [
            f"# blindinfer policy suggested from the evidence of {source}",
            "# Review every value against what you built and measured yourself before trusting it:",
            "# these are the values the server REPORTED.",
        ]
    )
    if report.simulation:
        out.lines += [
            "# WARNING: SIMULATION server: this policy only works with simulation=True and",
            "# protects nothing.",
        ]
    out.lines.append(f"[{section}]")
    for name in pinned:
        value = str(report.claims[name])
        if set(value) == {"0"}:
            out.lines.append(f"# {name} is all zero: not pinned (a zero value identifies no code)")
        else:
            out.lines.append(f'{name} = ["{value}"]')
    if report.kind == "intel-sgx":
        out.lines += [
            f"isvprodid = [{report.claims['isvprodid']}]",
            f"min_isvsvn = {report.claims['isvsvn']}",
        ]
    if report.kind == "intel-tdx":
        _tdx_attributes(out, report.claims)
    if report.kind in ("intel-sgx", "intel-tdx"):
        _tcb(out, report)
    if report.kind == "amd-snp":
        _snp_guest(out, report.claims)
    out.lines.append("allow_debug = false")
    return out


def _tdx_attributes(out: Suggestion, claims: Mapping[str, Claim]) -> None:
    attributes = str(claims["td_attributes"])
    wrong = default_td_attribute_violations(bytes.fromhex(attributes))
    if claims.get("debug"):
        wrong.insert(0, "DEBUG set")
    if wrong:
        out.warn(
            f"the TD runs with TD_ATTRIBUTES {attributes} ({', '.join(wrong)}), which the "
            "default refuses",
            "(SEPT_VE_DISABLE required; DEBUG, MIGRATABLE, PKS, KL and PERFMON refused).",
            "Relaunch the TD with the default attributes; uncommenting this accepts a TD the",
            "host has weakened:",
            f'td_attributes = "{attributes}"',
        )
    else:
        out.lines.append(f'td_attributes = "{attributes}"')
    out.lines.append(f'xfam = "{claims["xfam"]}"')


def _tcb(out: Suggestion, report: ReportedEvidence) -> None:
    out.lines += ['tcb_statuses = ["UpToDate"]', "accepted_advisories = []"]
    if report.tcb_status == "UpToDate" and not report.advisory_ids:
        return
    advisories = ", ".join(f'"{a}"' for a in report.advisory_ids)
    statuses = ", ".join(f'"{s}"' for s in dict.fromkeys(("UpToDate", report.tcb_status)))
    out.warn(
        f"the server reports TCB status {report.tcb_status} and advisories [{advisories}], "
        "which the default refuses",
        "(a known vulnerability may apply, see docs/tcb-status.md). Only after reading the",
        "advisories, and to accept that risk, replace the two lines above with:",
        f"tcb_statuses = [{statuses}]",
        f"accepted_advisories = [{advisories}]",
    )


def _snp_guest(out: Suggestion, claims: Mapping[str, Claim]) -> None:
    policy = GuestPolicy(int(str(claims["policy"]), 16))
    if policy.debug_allowed:
        out.warn(
            f"the guest's policy {int(policy):#x} allows debugging (the host can read its memory)",
            "blindinfer refuses such a guest whatever the policy says: relaunch it without DEBUG.",
        )
    if policy.migrate_ma:
        out.warn(
            f"the guest's policy {int(policy):#x} allows a migration agent (which can export "
            "the guest), which the default refuses",
            "uncommenting this accepts it:",
            "allow_migration_agent = true",
        )
    vmpl = claims.get("vmpl")
    if vmpl != 0:
        out.warn(
            f"the report comes from VMPL {vmpl}, not VMPL 0, which the default requires",
            "(a less privileged level may be host-controlled); uncommenting this accepts it:",
            f"vmpl = [{vmpl}]",
        )
