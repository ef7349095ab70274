"""Receipts on the client side: checking one as it arrives, saving it as a self-contained
proof, and verifying a proof offline (`blindinfer verify-receipt`).

A proof (`Receipt.save`) is JSON:
`{"blindinfer_receipt_proof": 1, "receipt": <JWS>, "bundle": <evidence bundle captured at
connect>, "boot_evidence": <the server's boot evidence, whose quote digest the receipt
names>, "certificate": <base64 DER of the TLS certificate>}`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from blindinfer.attestation.bundle import EvidenceBundle, bundle_from_json
from blindinfer.attestation.policy import Policy
from blindinfer.attestation.verifier import verify_evidence
from blindinfer.errors import KeyBindingError, ProtocolError
from blindinfer.protocol.evidence import (
    NONCE_SIZE,
    EvidenceDocument,
    evidence_document_from_json,
    evidence_document_json,
)
from blindinfer.protocol.receipts import measurement_of, parse_and_verify_jws, tensor_digest

PROOF_VERSION = 1
MAX_PROOF_BYTES = 4 * 1024 * 1024


def certificate_public_key(certificate_der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = x509.load_der_x509_certificate(certificate_der).public_key()
    except ValueError as exc:
        raise KeyBindingError("the TLS certificate cannot be parsed") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyBindingError("the TLS certificate's key is not an EC key")
    return key


@dataclass(frozen=True, slots=True)
class Receipt:
    """A verified receipt, with the evidence that makes it checkable offline."""

    jws: dict[str, str]
    payload: dict[str, Any]
    bundle: EvidenceBundle
    boot_evidence: EvidenceDocument

    @property
    def certificate_der(self) -> bytes:
        return self.bundle.tls_certificate_der

    def to_dict(self) -> dict[str, object]:
        return {
            "blindinfer_receipt_proof": PROOF_VERSION,
            "receipt": dict(self.jws),
            "bundle": self.bundle.to_dict(),
            "boot_evidence": evidence_document_json(self.boot_evidence),
            "certificate": base64.b64encode(self.certificate_der).decode(),
        }

    def save(self, path: str | Path) -> None:
        """Writes the self-contained proof (see the module docstring)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


class ReceiptedOutputs(dict[str, np.ndarray]):
    """The outputs of `run_model(..., receipt=True)`, with their verified `receipt`."""

    receipt: Receipt

    def __init__(self, outputs: Mapping[str, np.ndarray], receipt: Receipt) -> None:
        super().__init__(outputs)
        self.receipt = receipt


def check_receipt(
    jws: object,
    bundle: EvidenceBundle,
    boot_evidence: EvidenceDocument,
    *,
    kind: str,
    inputs: Mapping[str, npt.ArrayLike] | None = None,
    outputs: Mapping[str, npt.ArrayLike] | None = None,
) -> Receipt:
    """Signature by the bundle's (attested) TLS key, the evidence digest and measurement of
    `boot_evidence`, the kind, and the tensor digests of what is given. Raises ProtocolError.
    The evidence itself is verified by the caller (at connect, or by `verify_proof`)."""
    payload = parse_and_verify_jws(jws, certificate_public_key(bundle.tls_certificate_der))
    if payload.get("kind") != kind:
        raise ProtocolError(
            "invalid_receipt", f"expected a {kind} receipt, got {payload.get('kind')!r}"
        )
    if not isinstance(payload.get("time"), int) or not isinstance(payload.get("model"), dict):
        raise ProtocolError("invalid_receipt", "the receipt has no time or no model")
    _same(payload, "evidence_digest", hashlib.sha256(boot_evidence.quote).hexdigest())
    _same(payload, "measurement", measurement_of(boot_evidence.kind, boot_evidence.quote))
    if inputs is not None:
        _same(payload, "inputs_digest", tensor_digest(inputs))
    if outputs is not None:
        _same(payload, "outputs_digest", tensor_digest(outputs))
    assert isinstance(jws, Mapping)
    return Receipt(dict(jws), payload, bundle, boot_evidence)


def _same(payload: Mapping[str, Any], name: str, expected: str) -> None:
    got = payload.get(name)
    if not isinstance(got, str) or not hmac.compare_digest(got, expected):
        raise ProtocolError("invalid_receipt", f"the receipt's {name} does not match")


def load_proof(path: str | Path) -> Mapping[str, Any]:
    raw = Path(path).read_bytes()
    if len(raw) > MAX_PROOF_BYTES:
        raise ProtocolError("too_large", "the proof is too large")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("malformed_proof", "the proof is not valid JSON") from exc
    if not isinstance(document, dict) or document.get("blindinfer_receipt_proof") != PROOF_VERSION:
        raise ProtocolError("malformed_proof", "not a blindinfer receipt proof (version 1)")
    return document


def verify_proof(
    document: Mapping[str, Any],
    *,
    policy: Policy | None,
    simulation: bool,
    inputs: Mapping[str, npt.ArrayLike] | None = None,
    outputs: Mapping[str, npt.ArrayLike] | None = None,
) -> Receipt:
    """Offline: the signature by the certificate key that both evidence documents bind, both
    documents authentic (and within `policy`) at the receipt's time, the receipt's evidence
    digest and measurement, and the digests of the given tensors. Raises BlindInferError."""
    bundle = bundle_from_json(document.get("bundle"))
    try:
        certificate = base64.b64decode(str(document["certificate"]), validate=True)
        boot = evidence_document_from_json(document["boot_evidence"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError("malformed_proof", f"the proof has a bad field: {exc}") from exc
    if certificate != bundle.tls_certificate_der:
        raise KeyBindingError("the proof's certificate is not the one the evidence bound")
    jws = document.get("receipt")
    kind = _unverified_kind(jws)
    receipt = check_receipt(jws, bundle, boot, kind=kind, inputs=inputs, outputs=outputs)
    at = int(receipt.payload["time"])
    verify_evidence(
        bundle.evidence,
        policy=policy,
        expected_nonce=bundle.nonce,
        tls_certificate_der=bundle.tls_certificate_der,
        allow_simulation=simulation,
        now=at,
    )
    verify_evidence(
        boot,
        policy=policy,
        expected_nonce=bytes(NONCE_SIZE),
        tls_certificate_der=bundle.tls_certificate_der,
        allow_simulation=simulation,
        now=at,
    )
    return receipt


def _unverified_kind(jws: object) -> str:
    """The payload's kind before verification, only to select the check (it is signed)."""
    try:
        assert isinstance(jws, Mapping)
        text = str(jws["payload"])
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        kind = json.loads(raw)["kind"]
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise ProtocolError("invalid_receipt", "the proof's receipt is not a JWS") from exc
    if kind not in ("inference", "upload", "delete"):
        raise ProtocolError("invalid_receipt", f"unknown receipt kind {kind!r}")
    return str(kind)


__all__ = [
    "Receipt",
    "ReceiptedOutputs",
    "check_receipt",
    "load_proof",
    "verify_proof",
]
