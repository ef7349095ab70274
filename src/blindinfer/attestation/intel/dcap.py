"""Intel DCAP quote verification, delegated to dcap-qvl, against a PINNED root only.

dcap-qvl checks the quote signature, the QE report and its binding of the attestation
key, the PCK chain with CRLs, and the signed TCB info and QE identity at `now`; it
refuses debug enclaves. It does not look at MRENCLAVE, MRSIGNER or report_data: that is
the caller's policy (see `attestation.verifier`). This wrapper only makes sure the root
is one we pinned, bounds the input sizes, normalises the TCB status to Intel's names and
turns every failure into `QuoteVerificationError`, keeping dcap-qvl's reason (it says
"Debug mode is enabled", "TCBInfo expired", "No matching TCB level found", ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

import dcap_qvl  # type: ignore[import-untyped]  # has a .pyi but no py.typed marker

from blindinfer.attestation.roots import INTEL_SGX_ROOT, TrustRoot, root_for_der
from blindinfer.attestation.tcb import TCB_STATUSES
from blindinfer.errors import QuoteVerificationError

MAX_COLLATERAL_JSON_SIZE: Final = 256 * 1024
MAX_QUOTE_SIZE: Final = 1024 * 1024

COLLATERAL_FIELDS: Final = frozenset(
    {
        "pck_crl_issuer_chain",
        "root_ca_crl",
        "pck_crl",
        "tcb_info_issuer_chain",
        "tcb_info",
        "tcb_info_signature",
        "qe_identity_issuer_chain",
        "qe_identity",
        "qe_identity_signature",
    }
)

# dcap-qvl 0.7.0 returns the canonical names; older bindings documented upper-snake
# aliases, which are mapped so a binding change cannot silently change policy matching.
_STATUS_ALIASES: Final = {
    **{s: s for s in TCB_STATUSES},
    "OK": "UpToDate",
    "UP_TO_DATE": "UpToDate",
    "SW_HARDENING_NEEDED": "SWHardeningNeeded",
    "CONFIGURATION_NEEDED": "ConfigurationNeeded",
    "CONFIGURATION_AND_SW_HARDENING_NEEDED": "ConfigurationAndSWHardeningNeeded",
    "OUT_OF_DATE": "OutOfDate",
    "OUT_OF_DATE_CONFIGURATION_NEEDED": "OutOfDateConfigurationNeeded",
}


@dataclass(frozen=True, slots=True)
class DcapVerdict:
    """What dcap-qvl concluded about an authentic quote: TCB status and advisories."""

    status: str
    advisory_ids: tuple[str, ...]


def _check_collateral_fields(collateral_json: str) -> None:
    """Exactly the nine QuoteCollateralV3 fields: in particular no `pck_certificate_chain`,
    which dcap-qvl would verify *instead of* the chain inside the quote."""
    try:
        doc = json.loads(collateral_json)
    except (ValueError, RecursionError) as exc:
        raise QuoteVerificationError(f"malformed collateral: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise QuoteVerificationError("malformed collateral: not a JSON object")
    if set(doc) != COLLATERAL_FIELDS:
        unexpected = sorted(set(doc) - COLLATERAL_FIELDS)
        missing = sorted(COLLATERAL_FIELDS - set(doc))
        raise QuoteVerificationError(
            f"malformed collateral: unexpected fields {unexpected}, missing fields {missing}"
        )


def _reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def verify_dcap(quote: bytes, collateral_json: str, *, root: TrustRoot, now: int) -> DcapVerdict:
    """Verify `quote` with `collateral_json` at unix time `now`, chaining to `root`.

    `root` must be one of the pinned roots (compared by DER). For Intel's, dcap-qvl's
    built-in copy is used (the same DER: SHA-256 44a0196b...74d3); any other pinned
    root is passed to dcap-qvl explicitly.
    """
    pinned = root_for_der(root.der)
    if pinned is None:
        raise QuoteVerificationError(f"root {root.name!r} ({root.sha256}) is not a pinned root")
    if not isinstance(quote, bytes) or len(quote) > MAX_QUOTE_SIZE:
        raise QuoteVerificationError(f"quote must be bytes of at most {MAX_QUOTE_SIZE} bytes")
    if not isinstance(collateral_json, str) or len(collateral_json) > MAX_COLLATERAL_JSON_SIZE:
        raise QuoteVerificationError(
            f"collateral must be a JSON string of at most {MAX_COLLATERAL_JSON_SIZE} characters"
        )
    if not isinstance(now, int) or now < 0:
        raise QuoteVerificationError("verification time must be a non-negative unix time")
    _check_collateral_fields(collateral_json)
    try:
        collateral = dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
    except Exception as exc:
        raise QuoteVerificationError(f"malformed collateral: {_reason(exc)}") from exc
    try:
        if pinned is INTEL_SGX_ROOT:
            report = dcap_qvl.verify(quote, collateral, now)
        else:
            report = dcap_qvl.verify_with_root_ca(quote, collateral, pinned.der, now)
        raw_status: object = report.status
        advisories: tuple[object, ...] = tuple(report.advisory_ids)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # pyo3 turns Rust panics into a BaseException subclass
        raise QuoteVerificationError(
            f"dcap-qvl rejected the quote under {pinned.name}: {_reason(exc)}"
        ) from exc
    status = _STATUS_ALIASES.get(raw_status) if isinstance(raw_status, str) else None
    if status is None:
        raise QuoteVerificationError(f"DCAP verification returned TCB status {raw_status!r}")
    advisory_ids = tuple(a for a in advisories if isinstance(a, str))
    if len(advisory_ids) != len(advisories):
        raise QuoteVerificationError("DCAP verification returned malformed advisory ids")
    return DcapVerdict(status=status, advisory_ids=advisory_ids)
