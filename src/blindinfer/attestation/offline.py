"""`blindinfer verify`: verification of raw evidence files, offline, at a chosen time.

Without a policy it answers "is this evidence authentic?" (signatures, chains to pinned
roots, revocation, collateral validity at `at`) and reports every measured field and the
TCB status, whatever that status is. With a policy it also lists every mismatch. Raw
evidence has no TLS handshake and no nonce of ours, so binding and freshness are only
checked for bundles (`verify_bundle`).
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from blindinfer.attestation.authenticate import Authentic, authenticate, authenticate_snp
from blindinfer.attestation.nvidia.verify import GpuVerified, verify_nvidia_gpu
from blindinfer.attestation.policy import Policy
from blindinfer.attestation.report import Claim
from blindinfer.attestation.verifier import evaluate_policy
from blindinfer.errors import Mismatch, QuoteParseError

TDX_TEE_TYPE = 0x81


@dataclass(frozen=True, slots=True)
class OfflineResult:
    kind: str
    root: str
    simulation: bool
    tcb_status: str
    advisory_ids: tuple[str, ...]
    claims: Mapping[str, Claim]
    report_data: bytes
    policy_applied: bool
    mismatches: tuple[Mismatch, ...] = ()
    gpus: tuple[Mapping[str, Claim], ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        return {
            "authentic": True,
            "kind": self.kind,
            "root": self.root,
            "simulation": self.simulation,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "claims": dict(self.claims),
            "report_data": self.report_data.hex(),
            "gpus": [dict(g) for g in self.gpus],
            "policy_applied": self.policy_applied,
            "policy_satisfied": self.policy_applied and not self.mismatches,
            "mismatches": [
                {"field": m.field, "expected": m.expected, "got": m.got} for m in self.mismatches
            ],
        }


def parse_time(text: str) -> int:
    """T as Unix seconds or ISO 8601 (a date alone means midnight UTC)."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{text!r} is neither Unix seconds nor ISO 8601") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def intel_kind(quote: bytes) -> str:
    if len(quote) < 8:
        raise QuoteParseError("the quote is shorter than its header")
    version, _, tee_type = struct.unpack_from("<HHI", quote)
    return "intel-tdx" if version in (4, 5) and tee_type == TDX_TEE_TYPE else "intel-sgx"


def _result(
    authentic: Authentic,
    gpus: tuple[GpuVerified, ...],
    policy: Policy | None,
    *,
    collateral_json: str,
    at: int,
) -> OfflineResult:
    mismatches = (
        tuple(evaluate_policy(authentic, gpus, policy, collateral_json=collateral_json, now=at))
        if policy is not None
        else ()
    )
    return OfflineResult(
        kind=authentic.kind,
        root=authentic.root,
        simulation=authentic.simulation,
        tcb_status=authentic.tcb_status,
        advisory_ids=authentic.advisory_ids,
        claims=authentic.claims,
        report_data=authentic.report_data,
        policy_applied=policy is not None,
        mismatches=mismatches,
        gpus=tuple(gpu_claims(g) for g in gpus),
    )


def gpu_claims(gpu: GpuVerified) -> Mapping[str, Claim]:
    return {f"measurement[{i}]": value.hex() for i, value in sorted(gpu.measurements.items())}


def verify_intel_offline(
    quote: bytes,
    collateral_json: str,
    *,
    policy: Policy | None,
    at: int,
    simulation: bool = False,
) -> OfflineResult:
    authentic = authenticate(
        intel_kind(quote),
        quote,
        collateral_json=collateral_json,
        allow_simulation=simulation,
        now=at,
    )
    return _result(authentic, (), policy, collateral_json=collateral_json, at=at)


def verify_snp_offline(
    report: bytes,
    chip_certificate: bytes,
    chain_pem: bytes | None,
    *,
    policy: Policy | None,
    at: int,
    crl: bytes = b"",
) -> OfflineResult:
    """`crl`: AMD's CRL (DER or PEM); without it a policy's [snp] section refuses the
    report unless it sets allow_missing_crl (bundles carry the CRL in their evidence)."""
    authentic = authenticate_snp(report, chip_certificate, chain_pem=chain_pem, now=at, crl=crl)
    return _result(authentic, (), policy, collateral_json="", at=at)


def verify_nvidia_offline(
    report: bytes, certificates_pem: bytes, *, nonce: bytes | None, policy: Policy | None, at: int
) -> tuple[Mapping[str, Claim], tuple[Mismatch, ...]]:
    verified = verify_nvidia_gpu(report, certificates_pem, expected_nonce=nonce, now=at)
    mismatches = tuple(policy.gpu.validate(verified)) if policy and policy.gpu else ()
    return gpu_claims(verified), mismatches
