"""Receipts on the client side: checking one as it arrives, saving it as a self-contained
proof, and verifying a proof offline (`blindinfer verify-receipt`).

A proof (`Receipt.save`) is JSON:
`{"blindinfer_receipt_proof": 1, "receipt": <JWS>, "bundle": <evidence bundle captured at
connect>, "boot_evidence": <the server's boot evidence, whose quote digest the receipt
names>, "certificate": <base64 DER of the TLS certificate>}`.

A generation's proof is also its transcript: the same fields plus what the receipt's digests
cover, `"messages"` (chat) or `"prompt"` (text completion) as sent, and `"output"` (the
answer text as received), optionally `"prompt_token_ids"` and `"output_token_ids"`.
`verify_proof` recomputes the digests of every transcript field present
(`check_generation`); `verify_generation_receipt` checks a receipt against a transcript with
only the server's certificate (no evidence).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from blindinfer.protocol.receipts import (
    GENERATION_KIND,
    evidence_digest,
    measurement_of,
    parse_and_verify_jws,
    prompt_digest,
    tensor_digest,
    text_digest,
    token_ids_digest,
)

PROOF_VERSION = 1
MAX_PROOF_BYTES = 32 * 1024 * 1024
"""A generation's transcript holds its prompt (up to megabytes of text) and token ids."""
_KINDS = ("inference", "upload", "delete", GENERATION_KIND)
_TRANSCRIPT_FIELDS = ("messages", "prompt", "output", "prompt_token_ids", "output_token_ids")


@functools.lru_cache(maxsize=16)
def certificate_public_key(certificate_der: bytes) -> ec.EllipticCurvePublicKey:
    """The certificate's EC key. Cached: every receipt of a connection is checked against
    the same certificate (parsing it again cost ~0.01-0.08 ms per receipt)."""
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
    transcript: dict[str, Any] = field(default_factory=dict)
    """A generation's transcript fields (see the module docstring), saved with the proof."""

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
            **self.transcript,
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
    _same(payload, "evidence_digest", evidence_digest(boot_evidence.quote))
    _same(payload, "measurement", measurement_of(boot_evidence.kind, boot_evidence.quote))
    if inputs is not None:
        _same(payload, "inputs_digest", tensor_digest(inputs))
    if outputs is not None:
        _same(payload, "outputs_digest", tensor_digest(outputs))
    assert isinstance(jws, Mapping)
    return Receipt(dict(jws), payload, bundle, boot_evidence)


def _same(payload: Mapping[str, Any], name: str, expected: str, why: str = "") -> None:
    got = payload.get(name)
    if not isinstance(got, str) or not hmac.compare_digest(got, expected):
        detail = f": {why}" if why else ""
        raise ProtocolError("invalid_receipt", f"the receipt's {name} does not match{detail}")


def check_generation(
    payload: Mapping[str, Any],
    *,
    messages: Sequence[Mapping[str, Any]] | None = None,
    prompt: object = None,
    output: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    output_token_ids: Sequence[int] | None = None,
) -> list[str]:
    """Recomputes the digests of a generation receipt's (verified) payload from what is
    given of its transcript; returns the names of what matched. Raises ProtocolError."""
    if payload.get("kind") != GENERATION_KIND:
        raise ProtocolError(
            "invalid_receipt", f"expected a generation receipt, got {payload.get('kind')!r}"
        )
    checked = []
    if messages is not None or prompt is not None:
        try:
            expected = prompt_digest(messages=messages, prompt=prompt)
        except ValueError as exc:
            raise ProtocolError("malformed_proof", f"the transcript's prompt: {exc}") from exc
        _same(payload, "prompt_digest", expected, "the prompt is not the one the receipt signs")
        checked.append("prompt")
    if output is not None:
        if not isinstance(output, str):
            raise ProtocolError("malformed_proof", "the transcript's output is not text")
        _same(
            payload,
            "output_digest",
            text_digest(output),
            "the output is not the one the receipt signs",
        )
        checked.append("output")
    for name, ids, digest in (
        ("prompt tokens", prompt_token_ids, "prompt_tokens_digest"),
        ("output tokens", output_token_ids, "output_tokens_digest"),
    ):
        if ids is None:
            continue
        try:
            expected = token_ids_digest(list(ids))
        except (TypeError, ValueError) as exc:
            raise ProtocolError("malformed_proof", f"the transcript's {name}: {exc}") from exc
        _same(payload, digest, expected, f"the {name} are not the ones the receipt signs")
        checked.append(name)
    return checked


def verify_generation_receipt(
    jws: object,
    certificate_der: bytes,
    *,
    messages: Sequence[Mapping[str, Any]] | None = None,
    prompt: object = None,
    output: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    output_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The payload of a generation receipt if the key of `certificate_der` signed it and
    the given transcript matches its digests; raises ProtocolError (KeyBindingError for a
    bad certificate). Whether that certificate is an attested server's is the caller's to
    know (`Client.verify_generation` and `verify_proof` also check the evidence)."""
    payload = parse_and_verify_jws(jws, certificate_public_key(certificate_der))
    check_generation(
        payload,
        messages=messages,
        prompt=prompt,
        output=output,
        prompt_token_ids=prompt_token_ids,
        output_token_ids=output_token_ids,
    )
    return payload


def transcript_fields(
    *,
    messages: Sequence[Mapping[str, Any]] | None = None,
    prompt: object = None,
    output: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    output_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The transcript fields of a generation proof, JSON-ready (what is None is left out)."""
    fields: dict[str, Any] = {}
    if messages is not None:
        fields["messages"] = [dict(m) for m in messages]
    if prompt is not None:
        fields["prompt"] = prompt
    if output is not None:
        fields["output"] = output
    if prompt_token_ids is not None:
        fields["prompt_token_ids"] = [int(t) for t in prompt_token_ids]
    if output_token_ids is not None:
        fields["output_token_ids"] = [int(t) for t in output_token_ids]
    return fields


def _get(item: object, name: str) -> Any:
    """A field of an SDK object or of its JSON dict."""
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def receipt_and_text(response: Any) -> tuple[object, str | None]:
    """The receipt a completion of the `openai` SDK carries (`model_extra["receipt"]`: of a
    ChatCompletion, a Completion, or a stream's last chunk), and its answer text where the
    object holds the whole answer (a stream's chunks hold pieces: None). Also takes the
    response's JSON as a dict, or the receipt (JWS) itself."""
    if isinstance(response, Mapping) and "protected" in response:
        return response, None
    if isinstance(response, Mapping):
        receipt = response.get("receipt")
    else:
        receipt = (getattr(response, "model_extra", None) or {}).get("receipt")
    if receipt is None:
        raise ProtocolError(
            "invalid_receipt",
            "this response carries no receipt (a stream's receipt is on its last chunk)",
        )
    choices = _get(response, "choices") or []
    if not choices:
        return receipt, None
    message = _get(choices[0], "message")
    if message is not None:  # a whole chat.completion
        content = _get(message, "content")
        return receipt, content if isinstance(content, str) else None
    # a whole text_completion carries usage next to its choice; a streamed chunk never does
    text = _get(choices[0], "text")
    whole = _get(response, "usage") is not None and _get(choices[0], "delta") is None
    return receipt, text if whole and isinstance(text, str) else None


def _transcript(document: Mapping[str, Any]) -> dict[str, Any]:
    """A proof's transcript fields, their JSON types checked."""
    fields = {name: document[name] for name in _TRANSCRIPT_FIELDS if name in document}
    messages = fields.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise ProtocolError("malformed_proof", "the transcript's messages are not a list")
    for name in ("prompt_token_ids", "output_token_ids"):
        if name in fields and not isinstance(fields[name], list):
            raise ProtocolError("malformed_proof", f"the transcript's {name} is not a list")
    return fields


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
    if kind == GENERATION_KIND:
        transcript = _transcript(document)
        check_generation(receipt.payload, **transcript)
        receipt = dataclasses.replace(receipt, transcript=transcript)
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
    if kind not in _KINDS:
        raise ProtocolError("invalid_receipt", f"unknown receipt kind {kind!r}")
    return str(kind)


__all__ = [
    "Receipt",
    "ReceiptedOutputs",
    "check_generation",
    "check_receipt",
    "load_proof",
    "receipt_and_text",
    "transcript_fields",
    "verify_generation_receipt",
    "verify_proof",
]
