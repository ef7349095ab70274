"""The whole client-side verification of one evidence document, in order:

1. parse the quote (bounded, typed);
2. pick the root from the PINNED roots by the chain's last certificate; the simulation
   root only when the caller asked for simulation;
3. dcap-qvl: quote signature, QE report, PCK chain, CRLs, TCB info and QE identity, at `now`;
4. freshness: report_data[32:64] is the nonce this client just sent;
5. key binding: report_data[0:32] is SHA-256 of the SubjectPublicKeyInfo of the certificate
   seen in the TLS handshake (not the one the document carries);
6. policy: every field, all mismatches reported together.
Nothing is trusted because the evidence says so about itself.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blindinfer.attestation.dcap import verify_dcap
from blindinfer.attestation.policy import Policy
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.attestation.roots import TrustRoot, root_for_der
from blindinfer.attestation.sgx_quote import SgxQuote, parse_sgx_quote
from blindinfer.attestation.validate import validate_sgx
from blindinfer.errors import (
    DebugEnclaveError,
    FreshnessError,
    KeyBindingError,
    PolicyMismatchError,
    QuoteVerificationError,
    SimulationNotAllowedError,
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


def select_root(quote: SgxQuote, *, allow_simulation: bool) -> TrustRoot:
    chain = quote.signature.certificates
    if not chain:
        raise QuoteVerificationError("the quote carries no PCK certificate chain")
    root = root_for_der(chain[-1])
    if root is None:
        raise QuoteVerificationError(
            "the quote's certificate chain does not end at a pinned root (Intel SGX Root CA)"
        )
    if root.simulation and not allow_simulation:
        raise SimulationNotAllowedError(
            "this server runs in SIMULATION mode (its evidence chains to the blindinfer "
            "simulation root, not to Intel): it offers no confidentiality. Pass "
            "simulation=True only if you accept that."
        )
    return root


def verify_evidence(
    document: EvidenceDocument,
    *,
    policy: Policy | None,
    expected_nonce: bytes,
    tls_certificate_der: bytes,
    allow_simulation: bool,
    now: int | None = None,
) -> VerifiedAttestation:
    """Verifies `document`; `policy=None` checks authenticity only (for policy discovery)."""
    at = int(time.time()) if now is None else now
    quote = parse_sgx_quote(document.quote)  # step 1
    root = select_root(quote, allow_simulation=allow_simulation)  # step 2
    body = quote.body
    try:  # step 3
        verdict = verify_dcap(document.quote, document.collateral_json, root=root, now=at)
    except QuoteVerificationError as exc:
        if body.debug and "debug" in str(exc).lower():  # dcap-qvl's own reason, not ours
            raise DebugEnclaveError(
                f"the quote comes from a debug enclave, which offers no confidentiality ({exc})"
            ) from exc
        raise
    if not hmac.compare_digest(body.report_data[32:64], expected_nonce):  # step 4
        raise FreshnessError(
            "the evidence does not answer this client's nonce (replayed or stale evidence)"
        )
    if not hmac.compare_digest(body.report_data[:32], certificate_key_hash(tls_certificate_der)):
        raise KeyBindingError(  # step 5
            "the evidence does not bind the TLS key of this connection: someone between the "
            "client and the TEE presented its own certificate"
        )
    if policy is not None:  # step 6
        mismatches = validate_sgx(body, verdict.status, verdict.advisory_ids, policy.sgx)
        if mismatches:
            raise PolicyMismatchError(mismatches)
    return VerifiedAttestation(
        kind=document.kind,
        root=root.name,
        simulation=root.simulation,
        tcb_status=verdict.status,
        advisory_ids=verdict.advisory_ids,
        mrenclave=body.mrenclave,
        mrsigner=body.mrsigner,
        isvprodid=body.isvprodid,
        isvsvn=body.isvsvn,
        attributes=body.attributes,
        miscselect=body.miscselect.to_bytes(4, "little"),
        debug=body.debug,
        report_data=body.report_data,
        certificate_der=tls_certificate_der,
        nonce=expected_nonce,
        verified_at=at,
    )
