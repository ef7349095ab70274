"""The whole client-side verification of one evidence document, in order:

1. authenticity (`authenticate.py`): parse the evidence (bounded, typed); chain to a PINNED
   root (the simulation root only when the caller asked for simulation); signatures,
   collateral, CRLs and validity at `now` (dcap-qvl for Intel, our own for AMD);
2. key binding: report_data[0:32] is SHA-256 of the SubjectPublicKeyInfo of the certificate
   seen in the TLS handshake (not the one the document carries);
3. freshness: report_data[32:64] is the nonce this client just sent;
4. GPU evidence, if any: authentic, chained to NVIDIA's pinned root, answering the same nonce;
5. policy: the section for this evidence kind, every field, all mismatches reported together.
Nothing is trusted because the evidence says so about itself.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import time
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blindinfer.attestation.authenticate import Authentic, authenticate
from blindinfer.attestation.intel.sgx_quote import SgxReportBody
from blindinfer.attestation.intel.sgx_validate import validate_sgx
from blindinfer.attestation.intel.tdx_quote import TdReportBody
from blindinfer.attestation.nvidia.verify import GpuVerified, verify_nvidia_gpu
from blindinfer.attestation.policy import Policy
from blindinfer.attestation.report import GpuSummary, VerifiedAttestation
from blindinfer.attestation.snp.report import SnpReport
from blindinfer.errors import (
    FreshnessError,
    KeyBindingError,
    Mismatch,
    PolicyMismatchError,
)
from blindinfer.protocol.evidence import EvidenceDocument


def certificate_key_hash(certificate_der: bytes) -> bytes:
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
    except ValueError as exc:
        raise KeyBindingError("the server's TLS certificate cannot be parsed") from exc
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def authenticate_document(
    document: EvidenceDocument, *, allow_simulation: bool, now: int
) -> Authentic:
    return authenticate(
        document.kind,
        document.quote,
        collateral_json=document.collateral_json,
        chip_certificates=dict(document.chip_certificates),
        allow_simulation=allow_simulation,
        now=now,
        crl=document.crl,
    )


def check_binding(authentic: Authentic, tls_certificate_der: bytes) -> None:
    if not hmac.compare_digest(
        authentic.report_data[:32], certificate_key_hash(tls_certificate_der)
    ):
        raise KeyBindingError(
            "the evidence does not bind the TLS key of this connection: someone between the "
            "client and the TEE presented its own certificate, or the evidence was made for "
            "another key"
        )


def check_freshness(authentic: Authentic, expected_nonce: bytes) -> None:
    if not hmac.compare_digest(authentic.report_data[32:64], expected_nonce):
        raise FreshnessError(
            "the evidence does not answer this client's nonce (replayed or stale evidence)"
        )


def evaluate_policy(
    authentic: Authentic,
    gpus: tuple[GpuVerified, ...],
    policy: Policy,
    *,
    collateral_json: str = "",
    now: int,
) -> list[Mismatch]:
    """Every mismatch between authentic evidence and `policy`, in section order."""
    found: list[Mismatch] = []
    body = authentic.body
    if isinstance(body, SgxReportBody) and policy.sgx is not None:
        found += validate_sgx(body, authentic.tcb_status, authentic.advisory_ids, policy.sgx)
    elif isinstance(body, TdReportBody) and policy.tdx is not None:
        found += policy.tdx.validate(body, authentic.tcb_status, authentic.advisory_ids)
    elif isinstance(body, SnpReport) and policy.snp is not None:
        found += policy.snp.validate(body, product=str(authentic.claims.get("product", "")))
        found += _snp_revocation(authentic, policy.snp.allow_missing_crl)
    else:
        sections = [k for k in ("sgx", "tdx", "snp") if getattr(policy, k) is not None]
        found.append(Mismatch("kind", f"evidence for [{'], ['.join(sections)}]", authentic.kind))
    if policy.max_collateral_age_days is not None and collateral_json:
        found += _collateral_age(collateral_json, policy.max_collateral_age_days, now)
    if policy.gpu is not None:
        if not gpus:
            found.append(Mismatch("gpu", "NVIDIA GPU evidence", "none"))
        for gpu in gpus:
            found += policy.gpu.validate(gpu)
    return found


def _snp_revocation(authentic: Authentic, allow_missing_crl: bool) -> list[Mismatch]:
    """A missing AMD CRL is refused unless the policy says, in so many words, to accept it.

    Why here and not in `authenticate`: a CRL that is present is always checked there (a
    revoked ASK or a forged or expired CRL is never authentic); only its absence is a
    choice, and choices are the policy's.
    """
    if authentic.revocation_checked:
        return []
    if allow_missing_crl:
        warnings.warn(
            "SEV-SNP evidence without AMD's CRL accepted because the policy sets "
            "[snp] allow_missing_crl = true: a revoked ASK/ASVK would not be noticed",
            RevocationNotCheckedWarning,
            stacklevel=2,
        )
        return []
    return [
        Mismatch(
            "snp.allow_missing_crl",
            "AMD's CRL with the evidence (revocation checked); the server fetches it with "
            "--kds-url",
            "no CRL",
        )
    ]


class RevocationNotCheckedWarning(UserWarning):
    """Evidence was accepted without a revocation check, because the policy allowed it."""


def _collateral_age(collateral_json: str, max_days: int, now: int) -> list[Mismatch]:
    document = json.loads(collateral_json)
    found = []
    for name in ("tcb_info", "qe_identity"):
        issued = json.loads(document[name])["issueDate"]
        at = datetime.datetime.fromisoformat(issued.replace("Z", "+00:00")).timestamp()
        if now - at > max_days * 86400:
            age = (now - at) / 86400
            found.append(
                Mismatch(
                    f"collateral.{name}.issueDate",
                    f"at most {max_days} days old",
                    f"{age:.1f} days old",
                )
            )
    return found


def verify_gpus(
    document: EvidenceDocument, expected_nonce: bytes, now: int
) -> tuple[GpuVerified, ...]:
    return tuple(
        verify_nvidia_gpu(g.report, g.certificates_pem, expected_nonce=expected_nonce, now=now)
        for g in document.gpus
    )


def verify_evidence(
    document: EvidenceDocument,
    *,
    policy: Policy | None,
    expected_nonce: bytes,
    tls_certificate_der: bytes,
    allow_simulation: bool,
    now: int | None = None,
) -> VerifiedAttestation:
    """Verifies `document`; `policy=None` checks authenticity, binding and freshness only."""
    at = int(time.time()) if now is None else now
    authentic = authenticate_document(document, allow_simulation=allow_simulation, now=at)  # 1
    check_binding(authentic, tls_certificate_der)  # 2
    check_freshness(authentic, expected_nonce)  # 3
    gpus = verify_gpus(document, expected_nonce, at)  # 4
    if policy is not None:  # 5
        mismatches = evaluate_policy(
            authentic, gpus, policy, collateral_json=document.collateral_json, now=at
        )
        if mismatches:
            raise PolicyMismatchError(mismatches)
    return attestation_from(authentic, gpus, tls_certificate_der, expected_nonce, at)


def attestation_from(
    authentic: Authentic,
    gpus: tuple[GpuVerified, ...],
    tls_certificate_der: bytes,
    nonce: bytes,
    at: int,
) -> VerifiedAttestation:
    return VerifiedAttestation(
        kind=authentic.kind,
        root=authentic.root,
        simulation=authentic.simulation,
        tcb_status=authentic.tcb_status,
        advisory_ids=authentic.advisory_ids,
        claims=authentic.claims,
        report_data=authentic.report_data,
        certificate_der=tls_certificate_der,
        nonce=nonce,
        verified_at=at,
        gpus=tuple(GpuSummary("nvidia-h100", len(g.measurements)) for g in gpus),
    )
