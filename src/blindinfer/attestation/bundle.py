"""Evidence bundles: what a client saw when it attested a server, saved for later audits.

A bundle holds the server's evidence document exactly as received, the nonce the client
sent, the certificate of the TLS handshake and the capture time, so that `blindinfer verify
bundle.json` re-runs authenticity, binding, freshness and policy offline.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from blindinfer.errors import ProtocolError
from blindinfer.protocol.evidence import (
    EvidenceDocument,
    evidence_document_from_json,
    evidence_document_json,
)

BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EvidenceBundle:
    source: str
    captured_at: int
    nonce: bytes
    tls_certificate_der: bytes
    evidence: EvidenceDocument

    def to_dict(self) -> dict[str, object]:
        return {
            "blindinfer_bundle": BUNDLE_VERSION,
            "source": self.source,
            "captured_at": self.captured_at,
            "nonce": self.nonce.hex(),
            "tls_certificate": base64.b64encode(self.tls_certificate_der).decode(),
            "evidence": evidence_document_json(self.evidence),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")


def load_bundle(path: str | Path) -> EvidenceBundle:
    raw = Path(path).read_bytes()
    if len(raw) > MAX_BUNDLE_BYTES:
        raise ProtocolError("too_large", "the bundle is too large")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("malformed_bundle", "the bundle is not valid JSON") from exc
    return bundle_from_json(document)


def bundle_from_json(document: object) -> EvidenceBundle:
    """A bundle from its parsed JSON (as `EvidenceBundle.to_dict` writes it)."""
    if not isinstance(document, dict) or document.get("blindinfer_bundle") != BUNDLE_VERSION:
        raise ProtocolError("malformed_bundle", "not a blindinfer evidence bundle (version 1)")
    try:
        return EvidenceBundle(
            source=str(document["source"])[:500],
            captured_at=int(document["captured_at"]),
            nonce=bytes.fromhex(document["nonce"]),
            tls_certificate_der=base64.b64decode(document["tls_certificate"], validate=True),
            evidence=evidence_document_from_json(document["evidence"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(
            "malformed_bundle", f"the bundle is missing or has a bad field: {exc}"
        ) from exc
