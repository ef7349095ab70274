"""Is this evidence authentic? One function per evidence kind, pure (bytes, roots, time).

Authenticity is everything that does not depend on the caller's expectations: signatures,
certificate chains to PINNED roots, collateral, revocation and validity at `now`. Binding,
freshness and policy come after, in `verifier.py`. Each kind returns an `Authentic` with
the parsed body (for the policy section of that kind) and its claims (for reports).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blindinfer.attestation.intel.dcap import DcapVerdict, verify_dcap
from blindinfer.attestation.intel.sgx_quote import SgxReportBody, parse_sgx_quote
from blindinfer.attestation.intel.tdx_quote import TdReportBody, parse_tdx_quote
from blindinfer.attestation.report import Claim
from blindinfer.attestation.roots import INTEL_SGX_ROOT, TrustRoot, root_for_der
from blindinfer.attestation.snp.report import SnpReport
from blindinfer.attestation.snp.verify import verify_snp
from blindinfer.errors import (
    DebugEnclaveError,
    QuoteParseError,
    QuoteVerificationError,
    SimulationNotAllowedError,
)

NOT_APPLICABLE = "n/a"


@dataclass(frozen=True, slots=True)
class Authentic:
    kind: str
    root: str
    simulation: bool
    tcb_status: str
    advisory_ids: tuple[str, ...]
    report_data: bytes
    body: SgxReportBody | TdReportBody | SnpReport
    claims: MappingProxyType[str, Claim]
    revocation_checked: bool | None = None
    """SEV-SNP: whether AMD's ARK-signed CRL was checked (None: not an SNP kind)."""


def select_intel_root(chain: tuple[bytes, ...], *, allow_simulation: bool) -> TrustRoot:
    """Picks the root among the PINNED ones by the chain's last certificate."""
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


def _dcap(
    quote: bytes, collateral_json: str, root: TrustRoot, now: int, debug: bool
) -> DcapVerdict:
    if not collateral_json:
        raise QuoteVerificationError("no collateral was supplied with the Intel quote")
    try:
        return verify_dcap(quote, collateral_json, root=root, now=now)
    except QuoteVerificationError as exc:
        if debug and "debug" in str(exc).lower():  # dcap-qvl's own reason, not ours
            raise DebugEnclaveError(
                f"the quote comes from a debug enclave, which offers no confidentiality ({exc})"
            ) from exc
        raise


def authenticate_sgx(
    quote: bytes, collateral_json: str, *, allow_simulation: bool, now: int
) -> Authentic:
    parsed = parse_sgx_quote(quote)
    root = select_intel_root(parsed.signature.certificates, allow_simulation=allow_simulation)
    body = parsed.body
    verdict = _dcap(quote, collateral_json, root, now, body.debug)
    claims: dict[str, Claim] = {
        "mrenclave": body.mrenclave.hex(),
        "mrsigner": body.mrsigner.hex(),
        "isvprodid": body.isvprodid,
        "isvsvn": body.isvsvn,
        "attributes": body.attributes.hex(),
        "miscselect": body.miscselect.to_bytes(4, "little").hex(),
        "cpusvn": body.cpusvn.hex(),
        "config_id": body.config_id.hex(),
        "config_svn": body.config_svn,
        "debug": body.debug,
    }
    return Authentic(
        "intel-sgx",
        root.name,
        root.simulation,
        verdict.status,
        verdict.advisory_ids,
        body.report_data,
        body,
        MappingProxyType(claims),
    )


def authenticate_tdx(quote: bytes, collateral_json: str, *, now: int) -> Authentic:
    parsed = parse_tdx_quote(quote)
    root = select_intel_root(parsed.signature.certificates, allow_simulation=False)
    if root.der != INTEL_SGX_ROOT.der:
        raise QuoteVerificationError("TDX quotes must chain to Intel's root")
    body = parsed.body
    verdict = _dcap(quote, collateral_json, root, now, body.debug)
    claims: dict[str, Claim] = {
        name: getattr(body, name).hex()
        for name in (
            "mrtd",
            "rtmr0",
            "rtmr1",
            "rtmr2",
            "rtmr3",
            "mrconfigid",
            "mrowner",
            "mrownerconfig",
            "mrseam",
            "mrsignerseam",
            "td_attributes",
            "xfam",
            "tee_tcb_svn",
        )
    }
    claims["debug"] = body.debug
    return Authentic(
        "intel-tdx",
        root.name,
        False,
        verdict.status,
        verdict.advisory_ids,
        body.report_data,
        body,
        MappingProxyType(claims),
    )


def _pem(der: bytes) -> bytes:
    try:
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    except ValueError as exc:
        raise QuoteParseError("a supplied AMD certificate is not valid DER") from exc


def chain_from_roles(chip_certificates: dict[str, bytes]) -> bytes | None:
    """The supplied ASK/ASVK and ARK as PEM, in that order (never trusted as roots)."""
    parts = [chip_certificates[r] for r in ("ask", "asvk", "ark") if r in chip_certificates]
    return b"".join(_pem(der) for der in parts) or None


def authenticate_snp(
    report: bytes,
    chip_certificate: bytes | None,
    *,
    chain_pem: bytes | None,
    now: int,
    crl: bytes = b"",
) -> Authentic:
    """Authentic SNP evidence; `crl` (AMD's, DER) is checked when given. Whether its absence
    is acceptable is the policy's call (`evaluate_policy`), so `revocation_checked` says."""
    if chip_certificate is None:
        raise QuoteVerificationError("no VCEK or VLEK certificate was supplied with the SNP report")
    verified = verify_snp(
        report, chip_certificate, chain=chain_pem, now=now, crls=(crl,) if crl else ()
    )
    body = verified.report
    tcb = body.reported_tcb
    claims: dict[str, Claim] = {
        "measurement": body.measurement.hex(),
        "host_data": body.host_data.hex(),
        "id_key_digest": body.id_key_digest.hex(),
        "author_key_digest": body.author_key_digest.hex(),
        "family_id": body.family_id.hex(),
        "image_id": body.image_id.hex(),
        "policy": f"{body.policy:#x}",
        "debug": body.policy.debug_allowed,
        "vmpl": body.vmpl,
        "version": body.version,
        "guest_svn": body.guest_svn,
        "reported_tcb": (
            f"bootloader={tcb.bootloader} tee={tcb.tee} snp={tcb.snp} microcode={tcb.microcode}"
        ),
        "chip_id": body.chip_id.hex(),
        "product": verified.product,
        "signing_key": verified.key_kind,
        "revocation": "checked (AMD CRL)" if verified.revocation_checked else "no CRL supplied",
    }
    return Authentic(
        "amd-snp",
        f"AMD ARK ({verified.product})",
        False,
        NOT_APPLICABLE,
        (),
        body.report_data,
        body,
        MappingProxyType(claims),
        revocation_checked=verified.revocation_checked,
    )


def authenticate(
    kind: str,
    evidence: bytes,
    *,
    collateral_json: str = "",
    chip_certificates: dict[str, bytes] | None = None,
    allow_simulation: bool = False,
    now: int,
    crl: bytes = b"",
) -> Authentic:
    if kind == "intel-sgx":
        return authenticate_sgx(
            evidence, collateral_json, allow_simulation=allow_simulation, now=now
        )
    if kind == "intel-tdx":
        return authenticate_tdx(evidence, collateral_json, now=now)
    if kind == "amd-snp":
        roles = chip_certificates or {}
        chip = roles.get("vcek") or roles.get("vlek")
        return authenticate_snp(evidence, chip, chain_pem=chain_from_roles(roles), now=now, crl=crl)
    raise QuoteParseError(f"unknown evidence kind {kind[:40]!r}")
