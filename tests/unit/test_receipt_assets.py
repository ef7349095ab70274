"""Receipts saved before the switch to joserfc (tests/assets/receipts) verify after it, and
the new signer writes the same bytes (issue 13: the format is unchanged)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jws as jose
from joserfc.jwk import ECKey
from joserfc.jws import FlattenedJSONSerialization

from blindinfer.attestation.policy import load_policy
from blindinfer.cli.main import main
from blindinfer.client.receipts import load_proof, verify_proof
from blindinfer.errors import ProtocolError
from blindinfer.protocol.receipts import es256_sign, parse_and_verify_jws, sign_receipt

ASSETS = Path(__file__).parents[1] / "assets" / "receipts"
POLICY = ASSETS / "policy.toml"
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
KID = "35a3bff6333472daf86f5f699bec9b75ae0a8cf6b235ecead00de3b5538353a2"
MEASUREMENT = "b20b8ba61b54a4f371055273d9fcfc43d119b15b71a28c02a74235630640a855"
EVIDENCE = "4fea0a1a9d5b3fe48c80ab1928e372cad84e7600d6ebe5dbe211b1c23f76a4a7"

INFERENCE_PAYLOAD = {
    "evidence_digest": EVIDENCE,
    "inputs_digest": "19f16dd5c5aff8fe3a72bcba16351411ea08a7dd3ffa70a16caae951d153c50a",
    "kind": "inference",
    "measurement": MEASUREMENT,
    "model": {
        "model_id": "m-a9b0c78c453c395b81095a5291ad16b7",
        "sha256": "52e65f0c4c7e668d24355e131ed10bbeed871187123a13259607062b33f92b8c",
    },
    "outputs_digest": "1a941f8595e50825c1b88203593d321691ea99c5499044c4e5a6c6e2e86a0d06",
    "request_id": "ab8117ad3c586501fb85b4b62937d748",
    "time": 1796624534,
    "v": 1,
}
GENERATION_PAYLOAD = {
    "evidence_digest": EVIDENCE,
    "finish_reason": "length",
    "kind": "generation",
    "measurement": MEASUREMENT,
    "model": {
        "model_id": "m-43c2245d563996615f807c4c4514b980",
        "sha256": "fe0be67a865596b8d12ce0daad536fd19f1f388e290f80f260ab3005d5b5c07e",
    },
    "output_digest": "65e824b2fac84d9dcdd1870789d613a16c3d176f7b9c552560b26b630de8a97a",
    "output_tokens_digest": "c31df584c298456e97a48dd1d920bf97c7572287b23e3a1ecdd0daa3101104f9",
    "prompt_digest": "ed5fb2ee0ba734bd5712f04a95582aeb071b74cf2669b3c7b17f575ad2ebfa66",
    "prompt_tokens_digest": "f75e0f20e6a6b6308067748c952d94b3ca1947d9f5c68705b13013c5cc9449da",
    "request_id": "chatcmpl8cc8c109e8031d1bb9e3d389",
    "sampling": {
        "max_tokens": 12,
        "seed": None,
        "stop": ["§"],
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
    },
    "time": 1796624544,
    "usage": {"completion_tokens": 12, "prompt_tokens": 63},
    "v": 1,
}
TRANSCRIPT = {
    "messages": [
        {"role": "system", "content": "Réponds brièvement."},
        {"role": "user", "content": "tell me about the quiet river 👋"},
    ],
    "output": "\x0b cFenenent",
}
CASES = [("inference.json", INFERENCE_PAYLOAD), ("generation.json", GENERATION_PAYLOAD)]


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _saved(name: str) -> tuple[dict[str, Any], dict[str, str], ec.EllipticCurvePublicKey]:
    proof = dict(load_proof(ASSETS / name))
    public = x509.load_der_x509_certificate(base64.b64decode(proof["certificate"])).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return proof, proof["receipt"], public


def _npz(name: str) -> dict[str, np.ndarray]:
    with np.load(ASSETS / name) as archive:
        return {key: archive[key] for key in archive.files}


def test_the_saved_inference_proof_verifies_with_its_tensors() -> None:
    receipt = verify_proof(
        load_proof(ASSETS / "inference.json"),
        policy=load_policy(POLICY),
        simulation=True,
        inputs=_npz("inputs.npz"),
        outputs=_npz("outputs.npz"),
    )
    assert receipt.payload == INFERENCE_PAYLOAD
    with pytest.raises(ProtocolError, match=r"^invalid_receipt: the receipt's inputs_digest"):
        verify_proof(
            load_proof(ASSETS / "inference.json"),
            policy=load_policy(POLICY),
            simulation=True,
            inputs={k: v + 1 for k, v in _npz("inputs.npz").items()},
        )


def test_the_saved_generation_proof_verifies_with_its_transcript() -> None:
    receipt = verify_proof(
        load_proof(ASSETS / "generation.json"), policy=load_policy(POLICY), simulation=True
    )
    assert receipt.payload == GENERATION_PAYLOAD
    assert receipt.transcript == TRANSCRIPT


def test_verify_receipt_cli_accepts_the_saved_proofs(capsys: pytest.CaptureFixture[str]) -> None:
    tensors = ["--inputs", str(ASSETS / "inputs.npz"), "--outputs", str(ASSETS / "outputs.npz")]
    for name, extra, first_line in [
        (
            "inference.json",
            tensors,
            "VALID: evidence valid at the receipt's time; signed by the attested TLS key; "
            "inputs match; outputs match",
        ),
        (
            "generation.json",
            [],
            "VALID: evidence valid at the receipt's time; signed by the attested TLS key; "
            "prompt, output match the transcript; not in the transcript, not checked: "
            "prompt tokens, output tokens",
        ),
    ]:
        args = ["verify-receipt", str(ASSETS / name), "--policy", str(POLICY), "--simulation"]
        assert main([*args, *extra]) == 0
        assert capsys.readouterr().out.splitlines()[0] == first_line


@pytest.mark.parametrize(("name", "payload"), CASES, ids=["inference", "generation"])
def test_the_new_signer_writes_the_saved_header_and_payload_bytes(
    name: str, payload: dict[str, Any]
) -> None:
    _, saved, _ = _saved(name)
    assert _unb64(saved["protected"]) == (
        b'{"alg":"ES256","kid":"' + KID.encode() + b'","typ":"blindinfer-receipt+jwt"}'
    )
    key = ec.generate_private_key(ec.SECP256R1())
    signed = sign_receipt(payload, lambda m: es256_sign(key, m), KID)
    assert signed["protected"] == saved["protected"]
    assert signed["payload"] == saved["payload"]
    # the signature: base64url of r || s, 64 bytes, low S, checked with cryptography alone
    raw = _unb64(signed["signature"])
    assert len(signed["signature"]) == 86 and len(raw) == 64
    assert int.from_bytes(raw[32:], "big") <= P256_N // 2
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    message = f"{signed['protected']}.{signed['payload']}".encode()
    key.public_key().verify(der, message, ec.ECDSA(hashes.SHA256()))
    # and joserfc's own serializer, given the same header and payload bytes, agrees
    library = jose.serialize_json(
        {"protected": {"alg": "ES256", "kid": KID, "typ": "blindinfer-receipt+jwt"}},
        _unb64(saved["payload"]),
        ECKey.import_key(key),
        algorithms=["ES256"],
    )
    assert (library["protected"], library["payload"]) == (saved["protected"], saved["payload"])


@pytest.mark.parametrize(("name", "payload"), CASES, ids=["inference", "generation"])
def test_the_saved_signature_is_plain_es256(name: str, payload: dict[str, Any]) -> None:
    """Checked by stock joserfc (no receipt profile) and by cryptography on its own."""
    _, saved, public = _saved(name)
    assert parse_and_verify_jws(saved, public) == payload
    flattened: FlattenedJSONSerialization = {
        "protected": saved["protected"],
        "payload": saved["payload"],
        "signature": saved["signature"],
    }
    stock = jose.deserialize_json(flattened, ECKey.import_key(public), algorithms=["ES256"])
    assert json.loads(stock.payload) == payload
    raw = _unb64(saved["signature"])
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(
        der, f"{saved['protected']}.{saved['payload']}".encode(), ec.ECDSA(hashes.SHA256())
    )


def _flipped(text: str, index: int) -> str:
    raw = bytearray(_unb64(text))
    raw[index] ^= 0x01
    return _b64(bytes(raw))


@pytest.mark.parametrize("name", ["inference.json", "generation.json"])
def test_any_changed_byte_of_a_saved_receipt_is_refused(name: str) -> None:
    _, saved, public = _saved(name)
    for index in range(len(_unb64(saved["payload"]))):
        forged = {**saved, "payload": _flipped(saved["payload"], index)}
        with pytest.raises(ProtocolError) as refused:
            parse_and_verify_jws(forged, public)
        assert str(refused.value) == "invalid_receipt: the receipt's signature does not verify"
    for index in range(64):
        signature = _flipped(saved["signature"], index)
        high_s = int.from_bytes(_unb64(signature)[32:], "big") > P256_N // 2
        with pytest.raises(ProtocolError) as refused:
            parse_and_verify_jws({**saved, "signature": signature}, public)
        assert str(refused.value) == (
            "invalid_receipt: the receipt's signature is not low-S (s > n/2)"
            if high_s
            else "invalid_receipt: the receipt's signature does not verify"
        )
    for index in range(len(_unb64(saved["protected"]))):
        forged = {**saved, "protected": _flipped(saved["protected"], index)}
        with pytest.raises(ProtocolError) as refused:
            parse_and_verify_jws(forged, public)
        assert refused.value.code == "invalid_receipt"


def test_a_tampered_saved_proof_is_refused_offline() -> None:
    proof, saved, _ = _saved("inference.json")
    text = _unb64(saved["payload"]).replace(b'"outputs_digest":"1a94', b'"outputs_digest":"0a94')
    forged = {**proof, "receipt": {**saved, "payload": _b64(text)}}
    with pytest.raises(ProtocolError) as refused:
        verify_proof(forged, policy=load_policy(POLICY), simulation=True)
    assert str(refused.value) == "invalid_receipt: the receipt's signature does not verify"
