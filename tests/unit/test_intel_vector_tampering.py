"""Every authentic Intel vector, with one region changed, is refused; so is verifying it
outside its collateral window or against another (pinned) root."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from blindinfer.attestation.authenticate import authenticate
from blindinfer.attestation.intel.dcap import verify_dcap
from blindinfer.attestation.offline import intel_kind
from blindinfer.attestation.roots import SIMULATION_ROOT
from blindinfer.errors import QuoteVerificationError
from support import vectors

OK_CASES = [
    pytest.param(c, id=c["id"]) for c in vectors.cases("intel-dcap") if c["expect"] == "ok"
]


def _load(case: dict[str, Any]) -> tuple[bytes, str, int]:
    quote = vectors.path(case, "evidence").read_bytes()
    return quote, vectors.path(case, "collateral").read_text(), case["verify_at_unix"]


def _body_range(quote: bytes) -> tuple[int, int]:
    version = struct.unpack_from("<H", quote)[0]
    if version == 3:
        return 48, 432
    if version == 4:
        return 48, 632
    size = struct.unpack_from("<I", quote, 50)[0]
    return 54, 54 + size


def _flip(data: bytes, offset: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 0x01
    return bytes(changed)


def _in_certificate(quote: bytes) -> bytes:
    """Changes one base64 character inside the PCK certificate chain (still valid base64)."""
    at = quote.index(b"-----BEGIN CERTIFICATE-----") + 28 + 200
    changed = bytearray(quote)
    changed[at] = ord("A") if changed[at] != ord("A") else ord("B")
    return bytes(changed)


def _regions(quote: bytes) -> dict[str, bytes]:
    start, end = _body_range(quote)
    return {
        "header": _flip(quote, 30),
        "report body": _flip(quote, start + 64),
        "quote signature": _flip(quote, end + 4 + 10),
        "attestation key": _flip(quote, end + 4 + 64 + 10),
        "certification data": _in_certificate(quote),
    }


def _verify(quote: bytes, collateral: str, at: int) -> None:
    authenticate(intel_kind(quote), quote, collateral_json=collateral, now=at)


@pytest.mark.parametrize("case", OK_CASES)
def test_vector_is_authentic_as_is(case: dict[str, Any]) -> None:
    quote, collateral, at = _load(case)
    _verify(quote, collateral, at)


@pytest.mark.parametrize("case", OK_CASES)
@pytest.mark.parametrize(
    "region", ["header", "report body", "quote signature", "attestation key", "certification data"]
)
def test_one_changed_region_is_refused(case: dict[str, Any], region: str) -> None:
    quote, collateral, at = _load(case)
    with pytest.raises(QuoteVerificationError):
        _verify(_regions(quote)[region], collateral, at)


@pytest.mark.parametrize("case", OK_CASES)
@pytest.mark.parametrize("member", ["tcb_info", "qe_identity"])
def test_changed_signed_collateral_json_is_refused(case: dict[str, Any], member: str) -> None:
    quote, collateral, at = _load(case)
    document = json.loads(collateral)
    # one space after the first comma: the same JSON value, other signed bytes
    document[member] = document[member].replace(",", ", ", 1)
    with pytest.raises(QuoteVerificationError, match=r"(?i)signature|invalid"):
        _verify(quote, json.dumps(document), at)


@pytest.mark.parametrize("case", OK_CASES)
def test_outside_the_collateral_window_is_refused(case: dict[str, Any]) -> None:
    quote, collateral, at = _load(case)
    for moment in (at + 400 * 86400, at - 400 * 86400):
        with pytest.raises(QuoteVerificationError):
            _verify(quote, collateral, moment)


@pytest.mark.parametrize("case", OK_CASES)
def test_against_another_root_is_refused(case: dict[str, Any]) -> None:
    quote, collateral, at = _load(case)
    with pytest.raises(QuoteVerificationError):
        verify_dcap(quote, collateral, root=SIMULATION_ROOT, now=at)
