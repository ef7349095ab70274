"""The attestation message: what `POST /v2/attestation` carries each way.

Request: `{"nonce": "<64 hex>"}`. Response:

    {"version": 1, "kind": "intel-sgx" | "intel-tdx" | "amd-snp",
     "platform": "<informative>", "nonce": "<hex>",
     "quote": "<base64: DCAP quote, or SNP attestation report>",
     "collateral": {<dcap-qvl QuoteCollateralV3 JSON>} | null,
     "certificates": {"vcek" | "vlek" | "ask" | "asvk" | "ark": "<base64 DER>"},
     "crl": "<base64 DER of AMD's CRL for the chip key's kind and product>" | null,
     "certificate": "<base64 DER of the server's TLS certificate>",
     "gpus": [{"kind": "nvidia-h100", "report": "<base64>", "certificates": "<PEM>"}]}

`platform` and `certificate` are informative: the verifier decides trust from the
evidence's chain to a pinned root and binds the certificate it saw in the TLS handshake.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from blindinfer.errors import ProtocolError

NONCE_SIZE = 32
MAX_EVIDENCE_BYTES = 1024 * 1024
MAX_QUOTE_BYTES = 64 * 1024
MAX_COLLATERAL_BYTES = 256 * 1024
MAX_CERTIFICATE_BYTES = 16 * 1024
MAX_CRL_BYTES = 64 * 1024
MAX_GPUS = 8
KNOWN_KINDS = frozenset({"intel-sgx", "intel-tdx", "amd-snp"})
CHIP_CERTIFICATE_ROLES = frozenset({"vcek", "vlek", "ask", "asvk", "ark"})
GPU_KINDS = frozenset({"nvidia-h100"})


@dataclass(frozen=True, slots=True)
class GpuEvidence:
    kind: str
    report: bytes
    certificates_pem: bytes


@dataclass(frozen=True, slots=True)
class EvidenceDocument:
    kind: str
    platform: str
    nonce: bytes
    quote: bytes
    collateral_json: str
    certificate_der: bytes
    chip_certificates: tuple[tuple[str, bytes], ...] = ()
    gpus: tuple[GpuEvidence, ...] = ()
    crl: bytes = b""
    """AMD's CRL (DER, signed by the ARK) for SEV-SNP evidence; b"" when none came."""

    def chip_certificate(self, role: str) -> bytes | None:
        return next((der for name, der in self.chip_certificates if name == role), None)


def encode_nonce_request(nonce: bytes) -> bytes:
    return json.dumps({"nonce": nonce.hex()}).encode()


def parse_nonce_request(body: bytes) -> bytes:
    document = _json_object(body, 4096, "attestation request")
    try:
        nonce = _hex(document.get("nonce"), "nonce")
    except ProtocolError as exc:
        raise ProtocolError("invalid_nonce", exc.message) from exc
    if len(nonce) != NONCE_SIZE:
        raise ProtocolError(
            "invalid_nonce", f"the nonce must be {NONCE_SIZE} bytes (64 hex digits)"
        )
    return nonce


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def evidence_document_json(document: EvidenceDocument) -> dict[str, Any]:
    return {
        "version": 1,
        "kind": document.kind,
        "platform": document.platform,
        "nonce": document.nonce.hex(),
        "quote": _b64(document.quote),
        "collateral": json.loads(document.collateral_json) if document.collateral_json else None,
        "certificates": {role: _b64(der) for role, der in document.chip_certificates},
        "crl": _b64(document.crl) if document.crl else None,
        "certificate": _b64(document.certificate_der),
        "gpus": [
            {"kind": g.kind, "report": _b64(g.report), "certificates": g.certificates_pem.decode()}
            for g in document.gpus
        ],
    }


def encode_evidence_document(document: EvidenceDocument) -> bytes:
    return json.dumps(evidence_document_json(document), separators=(",", ":")).encode()


def parse_evidence_document(body: bytes) -> EvidenceDocument:
    return evidence_document_from_json(_json_object(body, MAX_EVIDENCE_BYTES, "evidence"))


def evidence_document_from_json(document: Any) -> EvidenceDocument:
    if not isinstance(document, dict):
        raise ProtocolError("malformed_evidence", "evidence must be a JSON object")
    if document.get("version") != 1:
        raise ProtocolError("unsupported_evidence", "evidence version must be 1")
    kind = document.get("kind")
    if not isinstance(kind, str) or kind not in KNOWN_KINDS:
        raise ProtocolError("unsupported_evidence", f"unknown evidence kind {str(kind)[:40]!r}")
    platform = document.get("platform")
    if not isinstance(platform, str) or len(platform) > 64:
        raise ProtocolError("malformed_evidence", "platform must be a short string")
    return EvidenceDocument(
        kind=kind,
        platform=platform,
        nonce=_hex(document.get("nonce"), "nonce"),
        quote=_base64(document.get("quote"), "quote", MAX_QUOTE_BYTES),
        collateral_json=_collateral(document.get("collateral"), kind),
        certificate_der=_base64(document.get("certificate"), "certificate", MAX_CERTIFICATE_BYTES),
        chip_certificates=_chip_certificates(document.get("certificates", {})),
        gpus=_gpus(document.get("gpus", [])),
        crl=_crl(document.get("crl"), kind),
    )


def _collateral(value: object, kind: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, dict) or not kind.startswith("intel-"):
        raise ProtocolError("malformed_evidence", "collateral must be a JSON object (Intel only)")
    collateral_json = json.dumps(value)
    if len(collateral_json) > MAX_COLLATERAL_BYTES:
        raise ProtocolError("malformed_evidence", "collateral is too large")
    return collateral_json


def _crl(value: object, kind: str) -> bytes:
    if value is None:
        return b""
    if kind != "amd-snp":
        raise ProtocolError("malformed_evidence", "crl is for amd-snp evidence only")
    return _base64(value, "crl", MAX_CRL_BYTES)


def _chip_certificates(value: object) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(value, dict) or len(value) > len(CHIP_CERTIFICATE_ROLES):
        raise ProtocolError("malformed_evidence", "certificates must be an object by role")
    found = []
    for role, encoded in value.items():
        if role not in CHIP_CERTIFICATE_ROLES:
            raise ProtocolError("malformed_evidence", f"unknown certificate role {role[:20]!r}")
        found.append((role, _base64(encoded, f"certificates.{role}", MAX_CERTIFICATE_BYTES)))
    return tuple(found)


def _gpus(value: object) -> tuple[GpuEvidence, ...]:
    if not isinstance(value, list) or len(value) > MAX_GPUS:
        raise ProtocolError("malformed_evidence", f"gpus must be a list of at most {MAX_GPUS}")
    gpus = []
    for item in value:
        if not isinstance(item, dict) or item.get("kind") not in GPU_KINDS:
            raise ProtocolError("malformed_evidence", "each gpu needs a known kind")
        pem = item.get("certificates")
        if not isinstance(pem, str) or len(pem) > 8 * MAX_CERTIFICATE_BYTES:
            raise ProtocolError("malformed_evidence", "gpu certificates must be PEM text")
        gpus.append(
            GpuEvidence(
                kind=str(item["kind"]),
                report=_base64(item.get("report"), "gpu report", MAX_QUOTE_BYTES),
                certificates_pem=pem.encode(),
            )
        )
    return tuple(gpus)


def _json_object(body: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(body) > limit:
        raise ProtocolError("too_large", f"the {what} is larger than {limit} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("malformed_json", f"the {what} is not valid JSON") from exc
    if not isinstance(document, dict):
        raise ProtocolError("malformed_json", f"the {what} must be a JSON object")
    return document


def _hex(value: object, field: str) -> bytes:
    if not isinstance(value, str) or len(value) > 256:
        raise ProtocolError("malformed_evidence", f"{field} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise ProtocolError("malformed_evidence", f"{field} must be a hex string") from exc


def _base64(value: object, field: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > limit * 4 // 3 + 4:
        raise ProtocolError(
            "malformed_evidence", f"{field} must be base64 of at most {limit} bytes"
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("malformed_evidence", f"{field} is not valid base64") from exc
