"""Receipt format: the exact tensor digest, JWS signing and what breaks verification."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from blindinfer.errors import ProtocolError
from blindinfer.protocol.receipts import (
    es256_sign,
    key_id,
    parse_and_verify_jws,
    sign_receipt,
    tensor_digest,
)

# a (FP32, [2]) = [1.0, 2.0] and b (INT64, scalar) = 7, hashed by hand:
#   u32 1, "a", u8 4, "FP32", u8 1, u64 2, f32 1.0, f32 2.0,
#   u32 1, "b", u8 5, "INT64", u8 0, i64 7
EXPECTED = "99c68abdfc59693bf763693ef577f131e1df71da2701237d1a142e7dc787e60f"


def test_tensor_digest_is_the_documented_format() -> None:
    arrays: dict[str, Any] = {
        "b": np.int64(7),
        "a": np.array([1.0, 2.0], dtype=">f4"),
    }  # unsorted, big-endian
    assert tensor_digest(arrays) == EXPECTED
    raw = (
        struct.pack("<I", 1) + b"a" + b"\x04FP32" + b"\x01" + struct.pack("<Q", 2)
        + struct.pack("<2f", 1.0, 2.0)
        + struct.pack("<I", 1) + b"b" + b"\x05INT64" + b"\x00" + struct.pack("<q", 7)
    )  # fmt: skip
    import hashlib

    assert hashlib.sha256(raw).hexdigest() == EXPECTED


def test_tensor_digest_depends_on_layout_not_memory_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert tensor_digest({"x": a}) == tensor_digest({"x": np.asfortranarray(a)})
    assert tensor_digest({"x": a}) != tensor_digest({"x": a.reshape(3, 2)})
    assert tensor_digest({"x": a}) != tensor_digest({"x": a.astype(np.float64)})
    assert tensor_digest({"x": a}) != tensor_digest({"y": a})


KEY = ec.generate_private_key(ec.SECP256R1())


def _payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "v": 1,
        "kind": "inference",
        "request_id": "r1",
        "time": 1_700_000_000,
        "model": {"sha256": "ab" * 32, "model_id": "m-" + "0" * 32},
        "inputs_digest": EXPECTED,
        "outputs_digest": EXPECTED,
        "measurement": "cd" * 32,
        "evidence_digest": "ef" * 32,
    }
    payload.update(changes)
    return payload


def _sign(payload: dict[str, Any], key: ec.EllipticCurvePrivateKey = KEY) -> dict[str, str]:
    return sign_receipt(payload, lambda m: es256_sign(key, m), key_id(key.public_key()))


def _b64(document: dict[str, Any]) -> str:
    data = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_sign_and_verify() -> None:
    jws = _sign(_payload())
    header = json.loads(base64.urlsafe_b64decode(jws["protected"] + "=="))
    assert header == {
        "alg": "ES256",
        "typ": "blindinfer-receipt+jwt",
        "kid": key_id(KEY.public_key()),
    }
    assert parse_and_verify_jws(jws, KEY.public_key()) == _payload()


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"sha256": "ac" * 32, "model_id": "m-" + "0" * 32}},
        {"inputs_digest": "00" * 32},
        {"outputs_digest": "00" * 32},
        {"time": 1_700_000_001},
        {"evidence_digest": "00" * 32},
        {"measurement": "00" * 32},
    ],
)
def test_any_change_to_the_payload_breaks_the_signature(change: dict[str, Any]) -> None:
    forged = {**_sign(_payload()), "payload": _b64(_payload(**change))}
    with pytest.raises(ProtocolError, match="signature"):
        parse_and_verify_jws(forged, KEY.public_key())


def test_a_receipt_signed_by_another_key_is_refused() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ProtocolError, match="another key"):
        parse_and_verify_jws(_sign(_payload(), other), KEY.public_key())
    # even claiming the attested key's kid, the signature does not verify
    lying = sign_receipt(_payload(), lambda m: es256_sign(other, m), key_id(KEY.public_key()))
    with pytest.raises(ProtocolError, match="signature"):
        parse_and_verify_jws(lying, KEY.public_key())


def test_malformed_receipts_are_refused() -> None:
    jws = _sign(_payload())
    for bad in ({}, {**jws, "extra": "x"}, {**jws, "signature": "!!"}, "text"):
        with pytest.raises(ProtocolError):
            parse_and_verify_jws(bad, KEY.public_key())
    none_alg = {**jws, "protected": _b64({"alg": "none", "typ": "blindinfer-receipt+jwt"})}
    with pytest.raises(ProtocolError):
        parse_and_verify_jws(none_alg, KEY.public_key())


def test_tls_identity_signs_without_exposing_its_key() -> None:
    from blindinfer.server.tls import make_tls_identity

    identity = make_tls_identity()
    assert "_key" not in repr(identity)
    jws = sign_receipt(_payload(), identity.sign, identity.key_id)
    from cryptography import x509

    public = x509.load_der_x509_certificate(identity.certificate_der).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert parse_and_verify_jws(jws, public) == _payload()


# --- one spelling per receipt (issue 21, item 19) -----------------------------------------

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _high_s_twin(jws: dict[str, str]) -> dict[str, str]:
    """The same signature as (r, n - s): valid ECDSA, a second spelling of the receipt."""
    raw = base64.urlsafe_b64decode(jws["signature"] + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    twin = r.to_bytes(32, "big") + (P256_N - s).to_bytes(32, "big")
    return {**jws, "signature": base64.urlsafe_b64encode(twin).rstrip(b"=").decode()}


def test_signatures_are_low_s_and_the_high_s_twin_is_refused() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    for _ in range(16):  # ~half of raw ECDSA signatures are high-S: all must come out low
        jws = _sign(_payload())
        raw = base64.urlsafe_b64decode(jws["signature"] + "==")
        assert int.from_bytes(raw[32:], "big") <= P256_N // 2
        twin = _high_s_twin(jws)
        twin_raw = base64.urlsafe_b64decode(twin["signature"] + "==")
        # the twin is a mathematically valid signature: only the low-S rule refuses it
        KEY.public_key().verify(
            encode_dss_signature(
                int.from_bytes(twin_raw[:32], "big"), int.from_bytes(twin_raw[32:], "big")
            ),
            f"{jws['protected']}.{jws['payload']}".encode(),
            ec.ECDSA(hashes.SHA256()),
        )
        with pytest.raises(ProtocolError, match=r"not low-S"):
            parse_and_verify_jws(twin, KEY.public_key())


@pytest.mark.parametrize("part", ["protected", "payload", "signature"])
@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda t: t[:10] + "\n" + t[10:], "not canonical base64url"),
        (lambda t: t[:10] + "*" + t[10:], "not canonical base64url"),
        (lambda t: t[:10] + " " + t[10:], "not canonical base64url"),
        (lambda t: t + "=" * (-len(t) % 4 or 4), "not canonical base64url"),
        (lambda t: t.replace("-", "+").replace("_", "/") + "+/", "not canonical base64url"),
        (lambda t: t + "A" * ((1 - len(t)) % 4 or 4), "not canonical base64url"),
    ],
    ids=["newline", "junk", "space", "padding", "std-alphabet", "dangling-char"],
)
def test_non_canonical_base64url_is_refused(part: str, spoil: Any, reason: str) -> None:
    jws = _sign(_payload())
    with pytest.raises(ProtocolError, match=reason):
        parse_and_verify_jws({**jws, part: spoil(jws[part])}, KEY.public_key())


def test_non_zero_trailing_bits_are_refused() -> None:
    jws = _sign(_payload())
    sig = jws["signature"]  # 64 bytes -> 86 chars, the last one carries 2 unused bits
    assert len(sig) == 86
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1]
    assert base64.urlsafe_b64decode(twin + "==") == base64.urlsafe_b64decode(sig + "==")
    with pytest.raises(ProtocolError, match="trailing bits"):
        parse_and_verify_jws({**jws, "signature": twin}, KEY.public_key())


@pytest.mark.parametrize("kid", ["é" * 64, "\u0660" * 64, "AB" * 32, "ab" * 31, 7, None], ids=str)
def test_a_malformed_kid_is_refused_cleanly(kid: object) -> None:
    """A non-ASCII kid used to end in a TypeError from hmac.compare_digest."""
    jws = _sign(_payload())
    header = {"alg": "ES256", "typ": "blindinfer-receipt+jwt", "kid": kid}
    data = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    protected = base64.urlsafe_b64encode(data.encode()).rstrip(b"=").decode()
    with pytest.raises(ProtocolError, match="kid is not a key id"):
        parse_and_verify_jws({**jws, "protected": protected}, KEY.public_key())


def test_a_non_ascii_payload_text_is_refused_cleanly() -> None:
    jws = _sign(_payload())
    with pytest.raises(ProtocolError, match="not canonical base64url"):
        parse_and_verify_jws({**jws, "payload": jws["payload"] + "é"}, KEY.public_key())
