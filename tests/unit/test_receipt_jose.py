"""The JOSE attacks a receipt verifier must refuse: the algorithm is pinned to ES256 (never
chosen by `alg`), no header names a key, and nothing but a flattened JWS signed by the
pinned key verifies. Each forgery carries a real signature, so only the rule under test
refuses it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws as jose
from joserfc.errors import BadSignatureError, UnsupportedAlgorithmError
from joserfc.jwk import ECKey, OctKey
from joserfc.jws import FlattenedJSONSerialization

from blindinfer.errors import ProtocolError
from blindinfer.protocol.receipts import (
    _REGISTRY,
    es256_sign,
    key_id,
    parse_and_verify_jws,
    sign_receipt,
)

KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC = KEY.public_key()
KID = key_id(PUBLIC)
ATTACKER = ec.generate_private_key(ec.SECP256R1())
TYP = "blindinfer-receipt+jwt"
PAYLOAD = {"v": 1, "kind": "inference", "request_id": "r1", "time": 1_700_000_000}
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(
    header: dict[str, Any], sign: Callable[[bytes], bytes], payload: str | None = None
) -> dict[str, str]:
    protected = _b64(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())
    body = _b64(json.dumps(PAYLOAD, separators=(",", ":"), sort_keys=True).encode())
    body = body if payload is None else payload
    signature = sign(f"{protected}.{body}".encode())
    return {"protected": protected, "payload": body, "signature": _b64(signature)}


def _refused(jws: object, reason: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_and_verify_jws(jws, PUBLIC)
    assert str(refused.value) == f"invalid_receipt: {reason}"


def _by(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    return lambda message: es256_sign(key, message)


def test_the_genuine_receipt_verifies() -> None:
    assert parse_and_verify_jws(sign_receipt(PAYLOAD, _by(KEY), KID), PUBLIC) == PAYLOAD


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_is_refused(alg: str) -> None:
    header = {"alg": alg, "kid": KID, "typ": TYP}
    _refused(_forge(header, lambda _: b""), "the receipt is not an ES256 receipt")
    # even with a valid ES256 signature next to it
    _refused(_forge(header, _by(KEY)), "the receipt is not an ES256 receipt")


SECRETS = {
    "spki-pem": PUBLIC.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ),
    "spki-der": PUBLIC.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ),
    "point": PUBLIC.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    ),
    "kid": KID.encode(),
}


@pytest.mark.parametrize("secret", SECRETS.values(), ids=SECRETS.keys())
def test_hs256_keyed_with_the_public_key_is_refused(secret: bytes) -> None:
    """Key confusion: an HMAC whose secret is the (public) verification key."""

    def mac(message: bytes) -> bytes:
        return hmac.new(secret, message, hashlib.sha256).digest()

    for alg in ("HS256", "HS384", "HS512"):
        forged = _forge({"alg": alg, "kid": KID, "typ": TYP}, mac)
        _refused(forged, "the receipt is not an ES256 receipt")
    # the same MAC under an ES256 header: 32 bytes are no ES256 signature
    _refused(
        _forge({"alg": "ES256", "kid": KID, "typ": TYP}, mac),
        "the receipt's signature is not ES256",
    )


@pytest.mark.parametrize(
    "alg",
    [
        *("ES384", "ES512", "ES256K", "RS256", "PS256", "EdDSA", "es256", " ES256", "ES256\x00"),
        *(["ES256"], None, 256),
    ],
    ids=str,
)
def test_only_es256_in_the_header_is_accepted(alg: object) -> None:
    """The signature is a valid ES256 one by the pinned key: only `alg` is wrong."""
    forged = _forge({"alg": alg, "kid": KID, "typ": TYP}, _by(KEY))
    _refused(forged, "the receipt is not an ES256 receipt")


def _attacker_jwk() -> dict[str, Any]:
    return dict(ECKey.import_key(ATTACKER.public_key()).as_dict())


@pytest.mark.parametrize(
    "extra",
    [
        {"jwk": _attacker_jwk()},
        {"jku": "https://attacker.invalid/jwks.json"},
        {"x5u": "https://attacker.invalid/cert.pem"},
        {"x5c": [_b64(b"\x30\x03\x02\x01\x01")]},
        {"crit": ["exp"], "exp": 1},
        {"crit": ["b64"], "b64": False},
        {"cty": "JWT"},
    ],
    ids=["jwk", "jku", "x5u", "x5c", "crit", "b64-false", "cty"],
)
@pytest.mark.parametrize("signer", ["attacker", "pinned key"])
def test_header_parameters_beyond_alg_typ_kid_are_refused(
    extra: dict[str, Any], signer: str
) -> None:
    """Injected key sources (jwk, jku, x5u, x5c), `crit` and unencoded payloads (b64: false)
    are refused, even when the pinned key signed them: the header is exactly alg, typ, kid."""
    key = ATTACKER if signer == "attacker" else KEY
    header = {"alg": "ES256", "kid": KID, "typ": TYP, **extra}
    _refused(_forge(header, _by(key)), "the receipt header has unknown parameters")


def test_an_unencoded_payload_is_refused() -> None:
    """RFC 7797 (b64: false): the payload text is signed as it is, here JSON."""
    header = {"alg": "ES256", "b64": False, "crit": ["b64"], "kid": KID, "typ": TYP}
    raw = json.dumps(PAYLOAD, separators=(",", ":"), sort_keys=True)
    _refused(_forge(header, _by(KEY), payload=raw), "the receipt's payload is not canonical "
             "base64url (only A-Z a-z 0-9 - _, no padding, no other characters)")  # fmt: skip


def test_a_jwk_naming_the_attackers_own_kid_is_refused() -> None:
    header = {"alg": "ES256", "kid": key_id(ATTACKER.public_key()), "typ": TYP}
    _refused(_forge(header, _by(ATTACKER)), "the receipt was signed by another key (kid)")
    _refused(
        _forge({**header, "jwk": _attacker_jwk()}, _by(ATTACKER)),
        "the receipt header has unknown parameters",
    )


def test_unprotected_headers_and_general_serialization_are_refused() -> None:
    genuine = sign_receipt(PAYLOAD, _by(KEY), KID)
    shape = "a receipt is a flattened JWS JSON object"
    _refused({**genuine, "header": {"alg": "ES256"}}, shape)
    general = {
        "payload": genuine["payload"],
        "signatures": [{"protected": genuine["protected"], "signature": genuine["signature"]}],
    }
    _refused(general, shape)
    compact = f"{genuine['protected']}.{genuine['payload']}.{genuine['signature']}"
    _refused(compact, shape)


def test_the_joserfc_registry_knows_es256_alone() -> None:
    """The second line, under the profile check: joserfc given the receipts' registry."""
    for alg in ("none", "HS256", "RS256", "ES384", "EdDSA"):
        with pytest.raises(UnsupportedAlgorithmError):
            _REGISTRY.get_alg(alg)
    secret = OctKey.import_key(SECRETS["kid"])  # joserfc itself refuses a PEM public key
    hs256 = jose.serialize_json({"protected": {"alg": "HS256"}}, b"{}", secret)
    with pytest.raises(UnsupportedAlgorithmError):
        jose.deserialize_json(hs256, secret, registry=_REGISTRY)
    # joserfc's own ES256 accepts the high-S twin; the receipts' does not
    genuine = sign_receipt(PAYLOAD, _by(KEY), KID)
    raw = base64.urlsafe_b64decode(genuine["signature"] + "==")
    high = raw[:32] + (P256_N - int.from_bytes(raw[32:], "big")).to_bytes(32, "big")
    twin: FlattenedJSONSerialization = {
        "protected": genuine["protected"],
        "payload": genuine["payload"],
        "signature": _b64(high),
    }
    jose.deserialize_json(twin, ECKey.import_key(PUBLIC), algorithms=["ES256"])
    with pytest.raises(BadSignatureError):
        jose.deserialize_json(twin, ECKey.import_key(PUBLIC), registry=_REGISTRY)


GENUINE = sign_receipt(PAYLOAD, _by(KEY), KID)


@settings(max_examples=300, deadline=None)
@given(
    part=st.sampled_from(["protected", "payload", "signature"]),
    index=st.integers(min_value=0, max_value=200),
    replacement=st.text(max_size=3),
)
def test_any_edit_of_a_receipt_is_refused_with_a_protocol_error(
    part: str, index: int, replacement: str
) -> None:
    text = GENUINE[part]
    edited = text[:index] + replacement + text[index + len(replacement) :]
    if edited == text:
        assert parse_and_verify_jws(GENUINE, PUBLIC) == PAYLOAD
        return
    with pytest.raises(ProtocolError) as refused:
        parse_and_verify_jws({**GENUINE, part: edited}, PUBLIC)
    assert refused.value.code == "invalid_receipt"


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from(["protected", "payload", "signature", "header"]),
            st.one_of(st.text(max_size=40), st.integers(), st.none()),
        ),
        st.text(max_size=40),
        st.lists(st.integers(), max_size=3),
    )
)
def test_arbitrary_input_is_a_protocol_error(jws: object) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_and_verify_jws(jws, PUBLIC)
    assert refused.value.code == "invalid_receipt"


def test_non_zero_trailing_bits_in_the_payload_are_refused() -> None:
    """Only joserfc decodes the payload: its decoder is held to the same one spelling."""
    signed = [sign_receipt({**PAYLOAD, "pad": "x" * n}, _by(KEY), KID) for n in range(3)]
    padded = next(jws for jws in signed if len(jws["payload"]) % 4)  # a last char with spare bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = padded["payload"][-1]
    twin = padded["payload"][:-1] + alphabet[alphabet.index(last) ^ 1]
    assert base64.urlsafe_b64decode(twin + "==") == base64.urlsafe_b64decode(
        padded["payload"] + "=="
    )
    _refused(
        {**padded, "payload": twin},
        "the receipt's payload is not canonical base64url (trailing bits)",
    )


def test_a_pinned_key_on_another_curve_is_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(ProtocolError) as refused:
        parse_and_verify_jws(GENUINE, p384)
    assert str(refused.value) == "invalid_receipt: the receipt's signature is not ES256"
