"""Verify an NVIDIA H100 confidential-computing attestation report (client side).

The GPU signs its SPDM measurement response with a per-device key whose certificate
chain ends at NVIDIA's Device Identity root CA. This module checks that signature,
that chain against the root pinned in `attestation.roots.nvidia` (never the one in the
evidence alone), and that the report answers the caller's nonce. It imports nothing
from the server, the TEE providers, the store or the runtime.

What it does NOT do yet (both need network access to NVIDIA, and are optional steps
for later): online revocation checks of the device chain (NVIDIA's OCSP responder), and
fetching NVIDIA's signed reference measurements (RIMs) for the driver and the VBIOS.
Until then the caller compares measurements with reference values it trusts
(`attestation.nvidia.policy`), and a revoked device would still verify.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from blindinfer.attestation.nvidia.spdm import (
    NONCE_SIZE,
    SIGNATURE_SIZE,
    NvidiaGpuReport,
    parse_nvidia_report,
)
from blindinfer.attestation.roots.nvidia import NVIDIA_DEVICE_ROOT
from blindinfer.errors import FreshnessError, QuoteParseError, QuoteVerificationError

MAX_CHAIN_PEM_SIZE: Final = 64 * 1024
"""An H100 device chain is five certificates, under 5 KiB of PEM."""

MIN_CHAIN_LENGTH: Final = 2
MAX_CHAIN_LENGTH: Final = 8
"""Hopper chains have 5 certificates (nvtrust insists on exactly 5); allow some headroom
for other GPU generations, but bound the work an attacker-chosen chain can cause."""

TCG_DICE_TCB_INFO_OID: Final = x509.ObjectIdentifier("2.23.133.5.4.1")
"""TCG DICE TcbInfo extension: in NVIDIA's leaf it ends with the SHA-384 firmware ID."""

_FWID_DER_PREFIX: Final = b"\x04\x30"  # OCTET STRING of 48 bytes: the SHA-384 FWID
_FWID_SIZE: Final = 48

_HANDLED_CRITICAL: Final = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})
"""Critical extensions this verifier understands; any other critical one is refused
(RFC 5280 section 4.2), rather than silently ignoring a constraint."""


class GpuNonceMismatchError(QuoteVerificationError, FreshnessError):
    """The report does not answer our nonce: a replay or someone else's evidence.

    Both a QuoteVerificationError (the GPU evidence is refused) and a FreshnessError (the
    reason is freshness), so callers catching either family see it.
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceCertInfo:
    """What the verified leaf (device attestation) certificate says about the GPU."""

    subject: str
    issuer: str
    serial_number: int
    not_before: datetime
    not_after: datetime
    fwid: bytes | None
    chain_sha256: tuple[str, ...]
    """SHA-256 of each certificate's DER, leaf first, root last (for logs and audits)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuVerified:
    """A report whose signature, chain and nonce verified; compare it with a policy next."""

    report: NvidiaGpuReport
    measurements: Mapping[int, bytes]
    nonce: bytes
    driver_version: str | None
    vbios_version: str | None
    fwid: bytes | None
    device_cert: DeviceCertInfo


def _as_utc(now: datetime | int) -> datetime:
    """The verification time; a naive datetime is refused rather than guessed at."""
    if isinstance(now, bool):
        raise TypeError("now must be a datetime or a Unix time in seconds")
    if isinstance(now, int):
        return datetime.fromtimestamp(now, tz=UTC)
    if isinstance(now, datetime):
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be timezone-aware (a naive datetime is ambiguous)")
        return now.astimezone(UTC)
    raise TypeError("now must be a datetime or a Unix time in seconds")


def _load_chain(cert_chain_pem: bytes) -> list[x509.Certificate]:
    if not isinstance(cert_chain_pem, bytes | bytearray | memoryview):
        raise QuoteParseError("the device certificate chain must be PEM bytes")
    if len(cert_chain_pem) > MAX_CHAIN_PEM_SIZE:
        raise QuoteParseError(f"device certificate chain exceeds {MAX_CHAIN_PEM_SIZE} bytes")
    try:
        certs = x509.load_pem_x509_certificates(bytes(cert_chain_pem))
    except ValueError as exc:
        raise QuoteParseError(f"device certificate chain is not PEM certificates: {exc}") from None
    if not MIN_CHAIN_LENGTH <= len(certs) <= MAX_CHAIN_LENGTH:
        raise QuoteVerificationError(
            f"device certificate chain has {len(certs)} certificates; expected "
            f"{MIN_CHAIN_LENGTH}..{MAX_CHAIN_LENGTH} (leaf first, NVIDIA root last)"
        )
    return certs


def _rfc4514(name: x509.Name) -> str:
    """A name for error messages; never raises on odd attribute values."""
    try:
        return name.rfc4514_string()
    except ValueError:
        return "<unprintable name>"


def _name(cert: x509.Certificate) -> str:
    return _rfc4514(cert.subject)


def _p384_key(cert: x509.Certificate, role: str) -> ec.EllipticCurvePublicKey:
    try:
        key = cert.public_key()
    except ValueError as exc:
        raise QuoteVerificationError(
            f"{role} {_name(cert)}: unreadable public key: {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise QuoteVerificationError(f"{role} {_name(cert)}: key is not ECDSA P-384")
    return key


def _extension(
    cert: x509.Certificate, oid: x509.ObjectIdentifier
) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # duplicate or malformed extensions
        raise QuoteVerificationError(f"certificate {_name(cert)}: bad extensions: {exc}") from None


def _check_certificate(
    cert: x509.Certificate, position: int, issued_below: int, when: datetime
) -> None:
    """Checks that concern one certificate: validity, critical extensions, CA rights.

    `position` 0 is the leaf; `issued_below` is how many CA certificates sit between it
    and the leaf (for pathLenConstraint).
    """
    role = "device certificate" if position == 0 else f"CA certificate {position}"
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise QuoteVerificationError(
            f"{role} {_name(cert)} is not valid at {when.isoformat()} (valid "
            f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})"
        )
    try:
        extensions = list(cert.extensions)
    except ValueError as exc:
        raise QuoteVerificationError(f"{role} {_name(cert)}: bad extensions: {exc}") from None
    for ext in extensions:
        if ext.critical and ext.oid not in _HANDLED_CRITICAL:
            raise QuoteVerificationError(
                f"{role} {_name(cert)} has an unsupported critical extension "
                f"{ext.oid.dotted_string}"
            )
    key_usage_ext = _extension(cert, ExtensionOID.KEY_USAGE)
    usage = key_usage_ext.value if key_usage_ext is not None else None
    if position == 0:
        if isinstance(usage, x509.KeyUsage) and not usage.digital_signature:
            raise QuoteVerificationError(
                f"{role} {_name(cert)} may not sign (keyUsage lacks digitalSignature)"
            )
        return
    constraints = _extension(cert, ExtensionOID.BASIC_CONSTRAINTS)
    if constraints is None or not isinstance(constraints.value, x509.BasicConstraints):
        raise QuoteVerificationError(f"{role} {_name(cert)} is not a CA (no basicConstraints)")
    if not constraints.value.ca:
        raise QuoteVerificationError(f"{role} {_name(cert)} is not a CA (basicConstraints)")
    path_length = constraints.value.path_length
    if path_length is not None and issued_below > path_length:
        raise QuoteVerificationError(
            f"{role} {_name(cert)} allows {path_length} CAs below it, the chain has {issued_below}"
        )
    if isinstance(usage, x509.KeyUsage) and not usage.key_cert_sign:
        raise QuoteVerificationError(
            f"{role} {_name(cert)} may not issue certificates (keyUsage lacks keyCertSign)"
        )


def _check_issued_by(child: x509.Certificate, issuer: x509.Certificate, position: int) -> None:
    """`issuer` named and signed `child`, with ECDSA P-384 / SHA-384 only."""
    if child.issuer != issuer.subject:
        raise QuoteVerificationError(
            f"certificate {position} ({_name(child)}) names issuer "
            f"{_rfc4514(child.issuer)}, but the next certificate is {_name(issuer)}"
        )
    if child.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
        raise QuoteVerificationError(
            f"certificate {position} ({_name(child)}) is not signed with ECDSA/SHA-384"
        )
    key = _p384_key(issuer, "issuer")
    try:
        key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise QuoteVerificationError(
            f"certificate {position} ({_name(child)}): signature by {_name(issuer)} is invalid"
        ) from None


def _verify_chain(certs: list[x509.Certificate], when: datetime) -> None:
    """Leaf ... root: every link signed by the next, the last one the pinned NVIDIA root."""
    root = certs[-1]
    root_der = root.public_bytes(Encoding.DER)
    if root_der != NVIDIA_DEVICE_ROOT.der:
        raise QuoteVerificationError(
            "device certificate chain does not end at NVIDIA's pinned Device Identity root "
            f"CA (got {_name(root)}, sha256 {hashlib.sha256(root_der).hexdigest()}; "
            f"pinned sha256 {NVIDIA_DEVICE_ROOT.sha256})"
        )
    for position, cert in enumerate(certs):
        _check_certificate(cert, position, max(position - 1, 0), when)
    for position in range(len(certs) - 1):
        _check_issued_by(certs[position], certs[position + 1], position)
    _check_issued_by(root, root, len(certs) - 1)  # the pinned root is self-signed


def _leaf_fwid(leaf: x509.Certificate) -> bytes | None:
    """The firmware ID in the leaf's TCG DICE TcbInfo extension (its last 48 bytes)."""
    ext = _extension(leaf, TCG_DICE_TCB_INFO_OID)
    if ext is None:
        return None
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    if len(raw) < len(_FWID_DER_PREFIX) + _FWID_SIZE or (
        raw[-_FWID_SIZE - len(_FWID_DER_PREFIX) : -_FWID_SIZE] != _FWID_DER_PREFIX
    ):
        raise QuoteVerificationError(
            "device certificate: the TCG DICE extension does not end with a 48-byte FWID"
        )
    return raw[-_FWID_SIZE:]


def _verify_report_signature(report: NvidiaGpuReport, leaf: x509.Certificate) -> None:
    key = _p384_key(leaf, "device certificate")
    sig = report.signature
    half = SIGNATURE_SIZE // 2
    der = encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
    try:
        key.verify(der, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise QuoteVerificationError(
            "GPU report signature is invalid (not made by the device certificate's key over "
            "the request and response)"
        ) from None


def verify_nvidia_gpu(
    report: bytes,
    cert_chain_pem: bytes,
    *,
    expected_nonce: bytes | None,
    now: datetime | int,
) -> GpuVerified:
    """Verify an H100 attestation report and its device certificate chain.

    Steps, in order (each failure raises QuoteVerificationError naming the reason;
    malformed bytes raise its subclass QuoteParseError):

    1. Parse the report: SPDM GET_MEASUREMENTS request + MEASUREMENTS response.
    2. Chain: 2..8 PEM certificates, leaf (device attestation key) first. The last one
       must be byte-identical to NVIDIA's pinned Device Identity root CA; each one is
       named as issuer by, and has signed (ECDSA P-384 / SHA-384), the one before it;
       every CA has basicConstraints CA and keyCertSign; every certificate is valid at
       `now` (NVIDIA's certificates run to 9999-12-31, which is fine; issuer names are
       compared as X.509 names, as their RDN order differs from link to link).
    3. FWID: if the report's opaque data carries a firmware ID, the leaf's TCG DICE
       extension must carry the same one (as NVIDIA's and trustee's verifiers check).
    4. Report signature: the leaf key's ECDSA P-384 signature (r || s) over
       `signed_bytes` (request + response up to the signature), hashed with SHA-384.
    5. Nonce: when `expected_nonce` is given, the requester nonce in the signed request
       must equal it (GpuNonceMismatchError otherwise). Pass None only where freshness
       is established another way.

    NOT done (optional later steps, they need NVIDIA's online services): OCSP
    revocation of the device chain, and fetching/verifying NVIDIA's RIMs (reference
    measurements for driver and VBIOS). Compare `measurements` with reference values
    through `attestation.nvidia.policy` instead.
    """
    when = _as_utc(now)
    if expected_nonce is not None and (
        not isinstance(expected_nonce, bytes) or len(expected_nonce) != NONCE_SIZE
    ):
        raise ValueError(f"expected_nonce must be {NONCE_SIZE} bytes or None")

    parsed = parse_nvidia_report(report)  # step 1
    certs = _load_chain(cert_chain_pem)
    _verify_chain(certs, when)  # step 2
    leaf = certs[0]
    cert_fwid = _leaf_fwid(leaf)
    report_fwid = parsed.response.opaque.fwid
    if report_fwid is not None and (  # step 3
        cert_fwid is None or not hmac.compare_digest(cert_fwid, report_fwid)
    ):
        raise QuoteVerificationError(
            f"FWID mismatch: report {report_fwid.hex()}, device certificate "
            f"{cert_fwid.hex() if cert_fwid is not None else 'none'}"
        )
    _verify_report_signature(parsed, leaf)  # step 4
    if expected_nonce is not None and not hmac.compare_digest(  # step 5
        parsed.requester_nonce, expected_nonce
    ):
        raise GpuNonceMismatchError(
            f"GPU report nonce {parsed.requester_nonce.hex()} does not match the expected "
            f"nonce {expected_nonce.hex()}"
        )
    opaque = parsed.response.opaque
    return GpuVerified(
        report=parsed,
        measurements=MappingProxyType(parsed.measurements),
        nonce=parsed.requester_nonce,
        driver_version=opaque.driver_version,
        vbios_version=opaque.vbios_version,
        fwid=report_fwid,
        device_cert=DeviceCertInfo(
            subject=_name(leaf),
            issuer=_rfc4514(leaf.issuer),
            serial_number=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            fwid=cert_fwid,
            chain_sha256=tuple(
                hashlib.sha256(c.public_bytes(Encoding.DER)).hexdigest() for c in certs
            ),
        ),
    )
