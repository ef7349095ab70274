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
