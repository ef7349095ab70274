"""The attestation message: what `POST /v2/attestation` carries each way.

Request: `{"nonce": "<64 hex>"}`. Response:
`{"version": 1, "kind": "intel-sgx", "platform": "<informative>", "nonce": "<hex>",
"quote": "<base64>", "collateral": {<dcap-qvl QuoteCollateralV3 JSON>},
"certificate": "<base64 DER>"}`.
`platform` and `certificate` are informative: the verifier decides trust from the
quote's chain to a pinned root and binds the certificate it saw in the TLS handshake.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from blindinfer.errors import ProtocolError

NONCE_SIZE = 32
MAX_EVIDENCE_BYTES = 512 * 1024
MAX_QUOTE_BYTES = 64 * 1024
MAX_COLLATERAL_BYTES = 256 * 1024
KNOWN_KINDS = frozenset({"intel-sgx"})


@dataclass(frozen=True, slots=True)
class EvidenceDocument:
    kind: str
    platform: str
    nonce: bytes
    quote: bytes
    collateral_json: str
    certificate_der: bytes


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


def encode_evidence_document(document: EvidenceDocument) -> bytes:
    return json.dumps(
        {
            "version": 1,
            "kind": document.kind,
            "platform": document.platform,
            "nonce": document.nonce.hex(),
            "quote": base64.b64encode(document.quote).decode(),
            "collateral": json.loads(document.collateral_json),
            "certificate": base64.b64encode(document.certificate_der).decode(),
        },
        separators=(",", ":"),
    ).encode()


def parse_evidence_document(body: bytes) -> EvidenceDocument:
    document = _json_object(body, MAX_EVIDENCE_BYTES, "evidence")
    if document.get("version") != 1:
        raise ProtocolError("unsupported_evidence", "evidence version must be 1")
    kind = document.get("kind")
    if not isinstance(kind, str) or kind not in KNOWN_KINDS:
        raise ProtocolError("unsupported_evidence", f"unknown evidence kind {str(kind)[:40]!r}")
    platform = document.get("platform")
    if not isinstance(platform, str) or len(platform) > 64:
        raise ProtocolError("malformed_evidence", "platform must be a short string")
    collateral = document.get("collateral")
    if not isinstance(collateral, dict):
        raise ProtocolError("malformed_evidence", "collateral must be a JSON object")
    collateral_json = json.dumps(collateral)
    if len(collateral_json) > MAX_COLLATERAL_BYTES:
        raise ProtocolError("malformed_evidence", "collateral is too large")
    return EvidenceDocument(
        kind=str(kind),
        platform=platform,
        nonce=_hex(document.get("nonce"), "nonce"),
        quote=_base64(document.get("quote"), "quote", MAX_QUOTE_BYTES),
        collateral_json=collateral_json,
        certificate_der=_base64(document.get("certificate"), "certificate", 16 * 1024),
    )


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
