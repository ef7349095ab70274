"""Inference, upload and deletion receipts: JWS (RFC 7515) signed by the attested TLS key.

Shared by the server (which signs) and the client and CLI (which verify); imports nothing
from the server. The exact format is documented in docs/receipts.md.

Container: JWS JSON serialization, flattened form
`{"protected": B64(header), "payload": B64(payload), "signature": B64(sig)}` where B64 is
base64url without padding. The bytes signed are exactly the ASCII string
`B64(header) + "." + B64(payload)` (RFC 7515 section 5.1). `alg` is ES256: ECDSA P-256
over SHA-256, the signature being the 64 bytes r || s (big-endian, 32 bytes each).
Header: `{"alg": "ES256", "typ": "blindinfer-receipt+jwt", "kid": hex SHA-256 of the
signing key's DER SubjectPublicKeyInfo}`, the same hash the TEE evidence carries in
report_data[0:32].

JOSE library: joserfc (pinned in pyproject.toml) signs (`es256_sign`: its ES256) and
verifies (`parse_and_verify_jws`: `joserfc.jws.deserialize_json`, i.e. the signing input,
r || s to DER, ECDSA P-256/SHA-256) against a registry that holds ES256 alone, with the one
key given: the header's `alg` never selects an algorithm and no header names a key.
Hand-written, because joserfc does not do it:
- low S, when signing and verifying (`_LowSES256`): joserfc keeps the S OpenSSL returns and
  accepts both (r, s) and (r, n - s), so a receipt would have two spellings;
- the receipt profile, checked on bounded text before joserfc sees it: each part one
  canonical base64url spelling (header and signature decoded here, to be checked; the
  payload decoded by joserfc alone, whose decoder is as strict); the header exactly `alg`,
  `typ`, `kid` (joserfc accepts the registered `jwk`, `jku`, `x5u`, `x5c`, `crit` and
  honours `b64: false`); `kid` the pinned key's hash; each refusal a `ProtocolError`
  naming the broken rule (joserfc's errors say "Invalid payload");
- `sign_receipt` joining the two segments: `serialize_json` needs the private key, which never
  leaves `TlsIdentity` (only its `sign` = `es256_sign` does), and would not sort the keys
  of the header and payload JSON, whose bytes are part of the format (docs/receipts.md).
Cost: docs/receipts.md, "Library".

Tensor digest (`inputs_digest`, `outputs_digest`): lowercase hex SHA-256 over, for each
tensor sorted by name (by Python string order, i.e. by code point):

- u32 little-endian byte length of the UTF-8 name, then the UTF-8 name;
- u8 length of the OIP datatype, then the datatype in ASCII (e.g. "FP32");
- u8 rank, then rank x u64 little-endian dimensions;
- the raw tensor bytes, little-endian, C (row-major) order (BOOL: one byte 0/1 each).

Generation receipts (kind "generation", `generation_fields`) sign digests that a third
party recomputes from a saved transcript with hashlib and json alone:

- `prompt_digest`: SHA-256 of `canonical_text_json(prompt_document(...))`, i.e. of
  `{"messages":[{"content":...,"role":...},...]}` (chat) or `{"prompt":"..."}` (text
  completion), JSON with sorted keys, no whitespace, non-ASCII as itself, UTF-8;
- `output_digest`: SHA-256 of the UTF-8 answer text exactly as the client received it;
- `prompt_tokens_digest`, `output_tokens_digest`: SHA-256 of the token ids as u32
  little-endian (the prompt as fed to the model, chat template included; every generated
  token, an end-of-sequence or stop token included), recomputed with the model's tokenizer.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws as jose
from joserfc.errors import BadSignatureError, DecodeError, JoseError
from joserfc.jwa import ESAlgorithm, JWSAlgModel
from joserfc.jwk import ECKey
from joserfc.jws import FlattenedJSONSerialization, JWSRegistry

from blindinfer.errors import ProtocolError
from blindinfer.protocol.datatypes import DATATYPES, dtype_to_datatype

RECEIPT_VERSION: Final = 1
RECEIPT_TYPE: Final = "blindinfer-receipt+jwt"
ALGORITHM: Final = "ES256"
MAX_JWS_BYTES: Final = 64 * 1024

Signer = Callable[[bytes], bytes]
"""`sign(message) -> r || s`: ES256 over `message` with the key the evidence binds."""


def tensor_digest(arrays: Mapping[str, npt.ArrayLike]) -> str:
    """The documented digest of a set of named tensors (hex SHA-256)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        datatype = dtype_to_datatype(array.dtype)
        array = array.astype(DATATYPES[datatype], order="C", copy=False)
        encoded_name = name.encode("utf-8")
        encoded_type = datatype.encode("ascii")
        digest.update(struct.pack("<I", len(encoded_name)) + encoded_name)
        digest.update(struct.pack("<B", len(encoded_type)) + encoded_type)
        digest.update(struct.pack(f"<B{array.ndim}Q", array.ndim, *array.shape))
        digest.update(array.data if array.size else b"")
    return digest.hexdigest()


GENERATION_KIND: Final = "generation"
_U32_LIMIT: Final = 1 << 32


def canonical_text_json(document: Mapping[str, Any]) -> bytes:
    """The one byte spelling a transcript's prompt is hashed in: JSON with sorted keys, no
    whitespace, non-ASCII characters as themselves (not escaped), UTF-8. In Python:
    `json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()`."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _content_text(content: object) -> str:
    """A chat message's content as the server's chat template receives it: a string, or
    the texts of a list of text parts joined with a newline (as the server joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not (
                isinstance(part, Mapping)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise ValueError("a message's content parts must be {'type': 'text', 'text': ...}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError("a message's content must be a string or a list of text parts")


def prompt_document(
    *, messages: Sequence[Mapping[str, Any]] | None = None, prompt: object = None
) -> dict[str, Any]:
    """What a generation's `prompt_digest` covers, from what the client sent: exactly one of
    `messages` (chat: each reduced to `{"role", "content"}`, content as a string) or
    `prompt` (text completion: a string, or a list holding exactly one). ValueError if
    neither or both, or if they are not of that shape."""
    if (messages is None) == (prompt is None):
        raise ValueError("a generation's prompt is either messages or a prompt text")
    if messages is not None:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError("messages must be a list of {'role', 'content'} objects")
        reduced = []
        for message in messages:
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError("messages must be a list of {'role', 'content'} objects")
            reduced.append(
                {"role": message["role"], "content": _content_text(message.get("content"))}
            )
        return {"messages": reduced}
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ValueError("a completion's prompt must be a string (or a list holding one)")
    return {"prompt": prompt}


def prompt_digest(
    *, messages: Sequence[Mapping[str, Any]] | None = None, prompt: object = None
) -> str:
    """The hex SHA-256 a generation receipt's `prompt_digest` holds (see the docstring)."""
    document = prompt_document(messages=messages, prompt=prompt)
    return hashlib.sha256(canonical_text_json(document)).hexdigest()


def text_digest(text: str) -> str:
    """`output_digest`: the hex SHA-256 of the answer's UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_ids_digest(ids: Sequence[int]) -> str:
    """`prompt_tokens_digest` / `output_tokens_digest`: hex SHA-256 of the ids, u32 LE each."""
    if not all(type(t) is int and 0 <= t < _U32_LIMIT for t in ids):
        raise ValueError("token ids must be integers from 0 to 2**32 - 1")
    return hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).hexdigest()


def generation_fields(
    *,
    prompt: Mapping[str, Any],
    sampling: Mapping[str, Any],
    output_text: str,
    finish_reason: str,
    prompt_token_ids: Sequence[int],
    output_token_ids: Sequence[int],
) -> dict[str, Any]:
    """The fields a generation receipt adds to the common ones (v, kind, request_id, time,
    model, measurement, evidence_digest). `prompt`: a `prompt_document`; `sampling`: the
    parameters the generation ran with (`SamplingParams.as_dict()`, seed included)."""
    if set(prompt) not in ({"messages"}, {"prompt"}):
        raise ValueError("prompt must be a prompt_document")
    return {
        "prompt_digest": hashlib.sha256(canonical_text_json(prompt)).hexdigest(),
        "prompt_tokens_digest": token_ids_digest(prompt_token_ids),
        "output_digest": text_digest(output_text),
        "output_tokens_digest": token_ids_digest(output_token_ids),
        "sampling": dict(sampling),
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": len(prompt_token_ids),
            "completion_tokens": len(output_token_ids),
        },
    }


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


@functools.lru_cache(maxsize=16)
def measurement_of(kind: str, quote: bytes) -> str:
    """The server's measured identity as its evidence states it: MRENCLAVE (hex) for SGX,
    otherwise "sha256:" + the hex SHA-256 of the evidence quote.

    Cached: every receipt names the same boot evidence, and parsing its SGX quote again
    cost ~0.04 ms per receipt on each side (docs/performance.md)."""
    if kind == "intel-sgx":
        from blindinfer.attestation.intel.sgx_quote import parse_sgx_quote

        return parse_sgx_quote(quote).body.mrenclave.hex()
    return "sha256:" + hashlib.sha256(quote).hexdigest()


@functools.lru_cache(maxsize=16)
def evidence_digest(quote: bytes) -> str:
    """A receipt's `evidence_digest`: the hex SHA-256 of the boot evidence's quote. Cached
    like `measurement_of`: every receipt names the same quote."""
    return hashlib.sha256(quote).hexdigest()


_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


def _b64(data: bytes) -> str:
    """base64url without padding; `binascii` directly (what `base64.urlsafe_b64encode`
    calls through two Python layers: on a receipt's path after an idle wait, every layer
    is a cache miss; docs/performance.md, "Receipts on MiniLM")."""
    return (
        binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")
    )


_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_KID: Final = re.compile(r"[0-9a-f]{64}")
_P256_ORDER: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_HEADER_NAMES: Final = frozenset({"alg", "typ", "kid"})
_MAX_SEGMENT: Final = 2 * MAX_JWS_BYTES
"""Longest base64url text accepted for one part, checked before anything decodes it."""


def _high_s(signature: bytes) -> bool:
    return int.from_bytes(signature[32:], "big") > _P256_ORDER // 2


class _LowSES256(ESAlgorithm):
    """joserfc's ES256 (P-256 keys only, r || s), with the one spelling receipts allow.

    ECDSA's (r, n - s) verifies as well as (r, s): joserfc signs with the S that OpenSSL
    returns and accepts both, which would give every receipt a second spelling. Here S is
    folded low when signing and a high S never verifies."""

    def __init__(self) -> None:
        super().__init__(ALGORITHM, "P-256", 256, recommended=True)

    def sign(self, msg: bytes, key: ECKey) -> bytes:
        raw = super().sign(msg, key)
        if _high_s(raw):
            raw = raw[:32] + (_P256_ORDER - int.from_bytes(raw[32:], "big")).to_bytes(32, "big")
        return raw

    def verify(self, msg: bytes, sig: bytes, key: ECKey) -> bool:
        return len(sig) == 64 and not _high_s(sig) and super().verify(msg, sig, key)


_ES256: Final = _LowSES256()


class _ReceiptRegistry(JWSRegistry):
    """What joserfc may use on a receipt: ES256, nothing else, whatever `alg` says.

    A table of its own: joserfc's class-wide one also holds `none`, HS256, RS256, ... The
    size bounds are this module's (joserfc's payload bound, 128000, is not)."""

    # joserfc reads both as class attributes, typed as instance ones (so no ClassVar)
    algorithms: dict[str, JWSAlgModel] = {ALGORITHM: _ES256}  # noqa: RUF012
    recommended: list[str] = [ALGORITHM]  # noqa: RUF012
    max_payload_length = _MAX_SEGMENT


_REGISTRY: Final = _ReceiptRegistry(algorithms=[ALGORITHM])
_KEYS: Final[dict[int, tuple[object, ECKey, str]]] = {}


def _jwk(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> tuple[ECKey, str]:
    """joserfc's ES256-checked view of `key` and its `key_id`, made once per key object:
    each costs ~10 us (a sixth of an ECDSA operation), and the server signs, and a
    connection verifies, with one key object. Keyed by identity (public keys are not
    hashable); an entry holds its key, so the id cannot be reused while cached."""
    cached = _KEYS.get(id(key))
    if cached is not None and cached[0] is key:
        return cached[1], cached[2]
    jwk = ECKey.import_key(key)
    _ES256.check_key(jwk)
    kid = key_id(key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key)
    if len(_KEYS) >= 16:
        _KEYS.clear()
    _KEYS[id(key)] = (key, jwk, kid)  # one assignment: safe from any thread under the GIL
    return jwk, kid


def _text(jws: Mapping[str, object], part: str, what: str) -> str:
    text = jws[part]
    if not isinstance(text, str) or len(text) > _MAX_SEGMENT:
        raise ProtocolError("invalid_receipt", f"the receipt's {what} is not base64url text")
    return text


def _check_alphabet(text: str, what: str) -> None:
    if _B64URL.fullmatch(text) is None or len(text) % 4 == 1:
        raise ProtocolError(
            "invalid_receipt",
            f"the receipt's {what} is not canonical base64url (only A-Z a-z 0-9 - _, no "
            "padding, no other characters)",
        )


def _unb64(text: str, what: str) -> bytes:
    """The bytes of `text` if it is their one canonical base64url spelling, else refused.

    Why so strict: a receipt is evidence that something happened, so one receipt must have
    one spelling. `urlsafe_b64decode` skips characters outside the alphabet and accepts
    padding and non-zero trailing bits, which lets anyone mint many distinct texts that
    verify as "the same" receipt. Only the unpadded alphabet is accepted, and the decoded
    bytes must encode back to exactly `text`. (The payload is decoded by joserfc, whose
    decoder is as strict: it gets `_check_alphabet` alone, for a precise refusal.)
    """
    _check_alphabet(text, what)
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise ProtocolError("invalid_receipt", f"the receipt's {what} is not base64url") from exc
    if _b64(raw) != text:
        raise ProtocolError(
            "invalid_receipt", f"the receipt's {what} is not canonical base64url (trailing bits)"
        )
    return raw


_CANONICAL: Final = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
"""`json.dumps(d, separators=(",", ":"), sort_keys=True)`, without a new encoder per call."""


def _canonical_json(document: Mapping[str, Any]) -> bytes:
    return _CANONICAL.encode(document).encode("utf-8")


@functools.lru_cache(maxsize=16)
def _protected(kid: str) -> str:
    """The protected header segment: the same for every receipt of a key."""
    return _b64(_canonical_json({"alg": ALGORITHM, "typ": RECEIPT_TYPE, "kid": kid}))


def sign_receipt(payload: Mapping[str, Any], sign: Signer, kid: str) -> dict[str, str]:
    """The JWS (flattened JSON serialization) of `payload`, signed by `sign`.

    The two segments are formed here, not by `joserfc.jws.serialize_json`: it needs the
    private key, and the TLS key never leaves `TlsIdentity` (only its `sign`, which is
    `es256_sign`, does); and header and payload must be the documented bytes (sorted keys),
    which joserfc does not sort."""
    header = _protected(kid)
    body = _b64(_canonical_json(payload))
    signature = sign(f"{header}.{body}".encode("ascii"))
    return {"protected": header, "payload": body, "signature": _b64(signature)}


def es256_sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ES256 as JWS wants it: r || s, 32 bytes each, low S (joserfc's, see _LowSES256)."""
    return _ES256.sign(message, _jwk(key)[0])


def parse_and_verify_jws(jws: object, public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The payload of `jws` if `public_key` signed it as a receipt; raises ProtocolError.

    The receipt profile is checked first, on bounded text (the module docstring says why
    joserfc does not); joserfc then verifies the signature with ES256 and `public_key`, the
    only algorithm and the only key it is given."""
    if not isinstance(jws, Mapping) or set(jws) != {"protected", "payload", "signature"}:
        raise ProtocolError("invalid_receipt", "a receipt is a flattened JWS JSON object")
    protected = _text(jws, "protected", "protected header")
    body = _text(jws, "payload", "payload")
    signature = _text(jws, "signature", "signature")
    header = _header(protected)
    _check_alphabet(body, "payload")  # joserfc decodes it, as strictly as _unb64
    if header.get("alg") != ALGORITHM or header.get("typ") != RECEIPT_TYPE:
        raise ProtocolError("invalid_receipt", f"the receipt is not an {ALGORITHM} receipt")
    if set(header) - _HEADER_NAMES:
        raise ProtocolError("invalid_receipt", "the receipt header has unknown parameters")
    kid = header.get("kid")
    if not isinstance(kid, str) or _KID.fullmatch(kid) is None:
        raise ProtocolError(
            "invalid_receipt", "the receipt's kid is not a key id (64 lower-case hex digits)"
        )
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise ProtocolError("invalid_receipt", "the receipt's signature is not ES256")
    jwk, pinned_kid = _jwk(public_key)
    if not hmac.compare_digest(kid.encode("ascii"), pinned_kid.encode("ascii")):
        raise ProtocolError("invalid_receipt", "the receipt was signed by another key (kid)")
    raw_signature = _unb64(signature, "signature")
    if len(raw_signature) != 64:
        raise ProtocolError("invalid_receipt", "the receipt's signature is not ES256")
    if _high_s(raw_signature):
        # (r, n - s) verifies too: accepting both would give each receipt a second
        # spelling. Signers emit low S (es256_sign), so a high S is refused.
        raise ProtocolError("invalid_receipt", "the receipt's signature is not low-S (s > n/2)")
    value: FlattenedJSONSerialization = {
        "protected": protected,
        "payload": body,
        "signature": signature,
    }
    try:
        verified = jose.deserialize_json(value, jwk, registry=_REGISTRY)
    except BadSignatureError as exc:
        raise ProtocolError("invalid_receipt", "the receipt's signature does not verify") from exc
    except DecodeError as exc:  # the header and signature passed _unb64: the payload
        raise ProtocolError(
            "invalid_receipt", "the receipt's payload is not canonical base64url (trailing bits)"
        ) from exc
    except (JoseError, ValueError) as exc:
        raise ProtocolError("invalid_receipt", "the receipt is not a valid ES256 JWS") from exc
    payload = _json_object(verified.payload, "payload")
    if payload.get("v") != RECEIPT_VERSION:
        raise ProtocolError("invalid_receipt", "unknown receipt version")
    return payload


@functools.lru_cache(maxsize=16)
def _header(protected: str) -> Mapping[str, Any]:
    """The decoded protected header (read-only: cached, shared). Every receipt of a key
    has the same one; only a header that decodes is cached, the checks run on each use."""
    return _json_object(_unb64(protected, "protected header"), "protected header")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_JWS_BYTES:
        raise ProtocolError("invalid_receipt", f"the receipt's {what} is too large")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("invalid_receipt", f"the receipt's {what} is not JSON") from exc
    if not isinstance(document, dict):
        raise ProtocolError("invalid_receipt", f"the receipt's {what} is not a JSON object")
    return document
