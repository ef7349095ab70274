"""Verify an AMD SEV-SNP attestation report against AMD's pinned certificate chain.

Client side and pure: no network, no clock of its own (the caller passes `now`), no
import from the server or the TEE providers. The trust chain is

    ARK (AMD root, RSA-4096, self-signed)  -- pinned in roots/amd, never from evidence
     └── ASK (VCEK signer) or ASVK (VLEK signer), RSA-PSS -- pinned too
          └── VCEK (per chip and TCB) or VLEK (per cloud), ECDSA P-384, from the evidence
               └── ATTESTATION_REPORT bytes 0x000..0x29F, ECDSA P-384 with SHA-384

Every failure raises `QuoteVerificationError` naming the check that failed; bytes that do
not parse raise its subclass `QuoteParseError`. Policy (measurement, debug, TCB minimums)
is not decided here: that is `SnpPolicy.validate`, on the `SnpVerified.report`.
"""

from __future__ import annotations

import base64
import binascii
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from blindinfer.attestation.roots.amd import AMD_PRODUCTS, AmdProductRoots
from blindinfer.attestation.snp.report import (
    PRODUCT_TURIN,
    SIG_ALGO_ECDSA_P384_SHA384,
    SIGNING_KEY_VCEK,
    SIGNING_KEY_VLEK,
    SnpReport,
    TcbVersion,
    parse_snp_report,
    tcb_layout_for,
)
from blindinfer.errors import QuoteParseError, QuoteVerificationError

KeyKind = Literal["vcek", "vlek"]

# AMD's X.509 extensions on VCEK/VLEK certificates (KDS specification, "VCEK Certificate").
_AMD_OID: Final = "1.3.6.1.4.1.3704.1"
OID_PRODUCT_NAME: Final = x509.ObjectIdentifier(f"{_AMD_OID}.2")
OID_BL_SPL: Final = x509.ObjectIdentifier(f"{_AMD_OID}.3.1")
OID_TEE_SPL: Final = x509.ObjectIdentifier(f"{_AMD_OID}.3.2")
OID_SNP_SPL: Final = x509.ObjectIdentifier(f"{_AMD_OID}.3.3")
OID_UCODE_SPL: Final = x509.ObjectIdentifier(f"{_AMD_OID}.3.8")
OID_FMC_SPL: Final = x509.ObjectIdentifier(f"{_AMD_OID}.3.9")
OID_HWID: Final = x509.ObjectIdentifier(f"{_AMD_OID}.4")

_PSS: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
"""AMD signs its certificates and CRLs with RSASSA-PSS, SHA-384, MGF1-SHA-384, salt 48."""

_TURIN_HWID_SIZE: Final = 8
"""Turin chip IDs are 8 bytes; the report zero-fills the rest of its 64-byte CHIP_ID."""

MAX_INPUT_SIZE: Final = 64 * 1024
"""Certificates, chains and CRLs larger than this are refused before parsing."""


@dataclass(frozen=True, slots=True)
class SnpVerified:
    """An authentic report: signed by a chip key that chains to AMD's pinned ARK.

    `report` has its TCB fields read in `product`'s layout. The chip ID (VCEK) and the
    reported TCB were checked against the chip certificate; nothing about the guest's
    identity or policy was: pass `report` to `SnpPolicy.validate`.
    """

    report: SnpReport
    product: str
    key_kind: KeyKind
    revocation_checked: bool = False
    """True when an ARK-signed CRL, current at `now`, was checked for the ASK/ASVK."""


def _fail(reason: str) -> QuoteVerificationError:
    return QuoteVerificationError(f"SEV-SNP: {reason}")


def _load_certificate(data: bytes, what: str) -> x509.Certificate:
    """One certificate from DER or PEM, without the serial-0 warning AMD's chip certs cause.

    AMD issues VCEKs and VLEKs with serial number 0, which RFC 5280 forbids and recent
    `cryptography` warns about on load. The warning is expected here and only here, so it
    is silenced for this one call and for no other warning.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise QuoteParseError(f"{what} must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_INPUT_SIZE:
        raise QuoteParseError(f"{what} of {len(raw)} bytes exceeds {MAX_INPUT_SIZE} bytes")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=".*serial number.*",
                category=CryptographyDeprecationWarning,
            )
            if raw.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(raw)
            return x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise QuoteParseError(f"{what} is not an X.509 certificate: {exc}") from None


_PEM_CERT: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]*?)-----END CERTIFICATE-----"
)


def _load_chain(chain: bytes) -> list[x509.Certificate]:
    """Every PEM certificate in `chain` (ASK and/or ASVK and ARK, in any order)."""
    if not isinstance(chain, bytes | bytearray | memoryview):
        raise QuoteParseError(f"the chain must be PEM bytes, not {type(chain).__name__}")
    raw = bytes(chain)
    if len(raw) > MAX_INPUT_SIZE:
        raise QuoteParseError(f"the chain of {len(raw)} bytes exceeds {MAX_INPUT_SIZE} bytes")
    certs: list[x509.Certificate] = []
    for match in _PEM_CERT.finditer(raw):
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise QuoteParseError(f"the chain has bad base64 in a PEM block: {exc}") from None
        certs.append(_load_certificate(der, "a chain certificate"))
    if not certs:
        raise QuoteParseError("the chain holds no PEM certificate")
    return certs


def _common_name(name: x509.Name) -> str:
    attributes = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attributes) != 1 or not isinstance(attributes[0].value, str):
        return ""
    return attributes[0].value


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _identify(
    chip: x509.Certificate, products: Mapping[str, AmdProductRoots]
) -> tuple[AmdProductRoots, KeyKind]:
    """Product and key kind from the chip certificate's issuer: SEV-<P> or SEV-VLEK-<P>."""
    issuer = _common_name(chip.issuer)
    subject = _common_name(chip.subject)
    for product in products.values():
        if issuer == f"SEV-{product.name}":
            kind: KeyKind = "vcek"
            break
        if issuer == f"SEV-VLEK-{product.name}":
            kind = "vlek"
            break
    else:
        raise _fail(
            f"chip certificate issuer {issuer!r} is not the ASK or ASVK of a known product "
            f"({', '.join(products)})"
        )
    if subject != f"SEV-{kind.upper()}":
        raise _fail(f"chip certificate subject {subject!r} is not SEV-{kind.upper()}")
    return product, kind


def _check_supplied_chain(
    certs: list[x509.Certificate],
    product: AmdProductRoots,
    products: Mapping[str, AmdProductRoots],
) -> None:
    """The supplied chain may only repeat pinned certificates of the chip's product.

    Why: the chain travels with the evidence, so it could name any root. It is never used
    to verify anything; a chain that differs from the pins is refused so that a forged or
    mixed-up chain is noticed instead of silently ignored.
    """
    # Self-signed certificates first: a foreign root is the most telling thing to report.
    for cert in sorted(certs, key=lambda c: c.issuer != c.subject):
        der = _der(cert)
        if der in (product.ark_der, product.ask_der, product.asvk_der):
            continue
        other = next(
            (p.name for p in products.values() if der in (p.ark_der, p.ask_der, p.asvk_der)),
            None,
        )
        if other is not None:
            raise _fail(
                f"the supplied chain holds a {other} certificate, but the chip certificate "
                f"is issued for {product.name}"
            )
        if cert.issuer == cert.subject:
            raise _fail(
                f"ARK is not a pinned AMD root: the supplied chain's self-signed "
                f"{_common_name(cert.subject)!r} differs from the pinned ARK-{product.name}"
            )
        raise _fail(
            f"ASK is not the pinned AMD signing key: the supplied chain's "
            f"{_common_name(cert.subject)!r} differs from the pinned {product.name} ASK/ASVK"
        )


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """`cert` names `issuer` as its issuer and carries its RSA-PSS SHA-384 signature."""
    if cert.issuer != issuer.subject:
        raise _fail(f"{what} is not issued by {_common_name(issuer.subject)!r}")
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        raise _fail(f"{what} is not signed with RSASSA-PSS")
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise _fail(f"the key of {_common_name(issuer.subject)!r} is not RSA")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise _fail(
            f"{what} is not signed by {_common_name(issuer.subject)!r} (RSA-PSS SHA-384)"
        ) from None


def _check_validity(cert: x509.Certificate, what: str, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise _fail(
            f"certificate not yet valid: the {what} is valid from "
            f"{cert.not_valid_before_utc.isoformat()}, it is {now.isoformat()}"
        )
    if now > cert.not_valid_after_utc:
        raise _fail(
            f"certificate expired: the {what} was valid until "
            f"{cert.not_valid_after_utc.isoformat()}, it is {now.isoformat()}"
        )


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail(f"a CRL must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_INPUT_SIZE:
        raise _fail(f"a CRL of {len(raw)} bytes exceeds {MAX_INPUT_SIZE} bytes")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(raw)
        return x509.load_der_x509_crl(raw)
    except ValueError as exc:
        raise _fail(f"a CRL is malformed: {exc}") from None


def _check_crls(
    crls: Sequence[bytes],
    ark: x509.Certificate,
    signer: x509.Certificate,
    chip: x509.Certificate,
    signer_name: str,
    now: datetime,
) -> bool:
    """Each CRL is AMD's, current at `now`, and does not revoke the chain we rely on.

    AMD's KDS CRL (/vcek/v1/<product>/crl, /vlek/v1/<product>/crl) is issued by the ARK
    and lists revoked ASKs/ASVKs, as go-sev-guest's `verifyCRL` reads it. Serial numbers
    are only unique per issuer, so an ARK-issued CRL is checked against the ASK/ASVK
    serial; a CRL issued by the ASK/ASVK (not published by AMD today, accepted for
    completeness) is checked against the chip certificate's serial. A CRL from anyone else
    is refused, and so is one without a nextUpdate (it could be replayed forever).

    Returns whether an ARK-issued CRL was among them: only that one speaks for the
    ASK/ASVK that every VCEK/VLEK hangs from.
    """
    ark_checked = False
    for data in crls:
        crl = _load_crl(data)
        if crl.issuer == ark.subject:
            issuer, revocable, revocable_name = ark, signer, signer_name
        elif crl.issuer == signer.subject:
            issuer, revocable, revocable_name = signer, chip, "chip certificate"
        else:
            raise _fail(f"CRL is not signed by the ARK: its issuer is {_common_name(crl.issuer)!r}")
        key = issuer.public_key()
        if crl.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
            key, rsa.RSAPublicKey
        ):
            raise _fail("CRL is not signed with RSASSA-PSS by an RSA key")
        try:
            key.verify(crl.signature, crl.tbs_certlist_bytes, _PSS, hashes.SHA384())
        except InvalidSignature:
            raise _fail(
                f"CRL is not signed by the ARK: its signature does not verify with "
                f"{_common_name(issuer.subject)!r}"
            ) from None
        if now < crl.last_update_utc:
            raise _fail(f"CRL is not yet valid: issued {crl.last_update_utc.isoformat()}")
        next_update = crl.next_update_utc
        if next_update is None:
            raise _fail("CRL has no nextUpdate: it would never expire, so it is refused")
        if now > next_update:
            raise _fail(f"CRL expired: its next update was due {next_update.isoformat()}")
        if crl.get_revoked_certificate_by_serial_number(revocable.serial_number) is not None:
            raise _fail(
                f"the {revocable_name} (serial {revocable.serial_number}) is revoked by "
                f"{_common_name(issuer.subject)!r}'s CRL"
            )
        ark_checked = ark_checked or issuer is ark
    return ark_checked


def _der_integer(value: bytes, what: str) -> int:
    """A non-negative DER INTEGER (tag, short length, minimal big-endian content)."""
    if len(value) < 3 or value[0] != 0x02 or value[1] & 0x80 or value[1] != len(value) - 2:
        raise _fail(f"the chip certificate's {what} extension is not a DER INTEGER")
    content = value[2:]
    if content[0] & 0x80:
        raise _fail(f"the chip certificate's {what} extension is negative")
    if len(content) > 1 and content[0] == 0 and not content[1] & 0x80:
        raise _fail(f"the chip certificate's {what} extension is not minimally encoded")
    return int.from_bytes(content, "big")


def _extension_bytes(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str) -> bytes:
    try:
        extension = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        raise _fail(f"the chip certificate has no {what} extension ({oid.dotted_string})") from None
    except ValueError as exc:  # duplicate or malformed extensions
        raise _fail(f"the chip certificate's extensions are malformed: {exc}") from None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise _fail(f"the chip certificate's {what} extension has an unexpected type")
    return value.value


def _certified_tcb(cert: x509.Certificate, product: str) -> TcbVersion:
    """The TCB_VERSION that a VCEK/VLEK certifies, from its SPL extensions."""

    def spl(oid: x509.ObjectIdentifier, what: str) -> int:
        number = _der_integer(_extension_bytes(cert, oid, what), what)
        if number > 0xFF:
            raise _fail(f"the chip certificate's {what} {number} does not fit a TCB byte")
        return number

    layout = tcb_layout_for(product)
    return TcbVersion.from_parts(
        bootloader=spl(OID_BL_SPL, "blSPL"),
        tee=spl(OID_TEE_SPL, "teeSPL"),
        snp=spl(OID_SNP_SPL, "snpSPL"),
        microcode=spl(OID_UCODE_SPL, "ucodeSPL"),
        fmc=spl(OID_FMC_SPL, "fmcSPL") if layout == "turin" else None,
        layout=layout,
    )


def _check_chip_id(report: SnpReport, chip: x509.Certificate, product: str) -> None:
    """A VCEK is made for one chip: its hwID must be the report's CHIP_ID."""
    if report.mask_chip_key:
        # The host masked CHIP_ID (the PSP wrote zeros). The VCEK signature alone still
        # ties the report to the chip; only the redundant hwID comparison is impossible.
        if any(report.chip_id):
            raise _fail("chip ID does not match: MASK_CHIP_KEY is set but CHIP_ID is not zero")
        return
    hwid = _extension_bytes(chip, OID_HWID, "hwID")
    if product == PRODUCT_TURIN and len(hwid) == _TURIN_HWID_SIZE:
        expected = hwid + bytes(len(report.chip_id) - _TURIN_HWID_SIZE)
    else:
        expected = hwid
    if expected != report.chip_id:
        raise _fail(
            f"chip ID does not match the VCEK's hwID: report {report.chip_id.hex()}, "
            f"VCEK {hwid.hex()}"
        )


def _as_datetime(now: datetime | int) -> datetime:
    if isinstance(now, bool):
        raise TypeError("now must be a datetime or a unix time in seconds")
    if isinstance(now, int):
        if now < 0:
            raise ValueError("now must not be before 1970")
        return datetime.fromtimestamp(now, tz=UTC)
    if isinstance(now, datetime):
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be timezone-aware (a naive datetime is ambiguous)")
        return now.astimezone(UTC)
    raise TypeError("now must be a datetime or a unix time in seconds")


def verify_snp(
    report: bytes,
    chip_certificate: bytes,
    *,
    chain: bytes | None = None,
    now: datetime | int,
    crls: Sequence[bytes] = (),
    trusted_products: Mapping[str, AmdProductRoots] | None = None,
) -> SnpVerified:
    """Verify an SEV-SNP report and its VCEK/VLEK at `now` (aware datetime or unix seconds).

    Steps:
     1. Parse the 1184-byte report (`QuoteParseError` if malformed) and the chip
        certificate (DER or PEM).
     2. Identify the product (Milan/Genoa/Turin) and the key kind from the chip
        certificate's issuer: "SEV-<product>" is the ASK (VCEK), "SEV-VLEK-<product>" the
        ASVK (VLEK).
     3. If a `chain` is supplied, each of its certificates must be the pinned ARK, ASK or
        ASVK of that product; it is never used as a root.
     4. The pinned ARK is self-signed with RSA-PSS (SHA-384, salt 48).
     5. The ASK (VCEK) or ASVK (VLEK) is signed by the ARK with RSA-PSS.
     6. The VCEK/VLEK is signed by the ASK/ASVK with RSA-PSS.
     7. ARK, ASK/ASVK and chip certificate are all valid at `now`.
     8. Each CRL in `crls` is signed by the ARK (or the ASK/ASVK), current at `now` (and
        has a nextUpdate), and does not list the ASK/ASVK (or chip certificate) serial.
        `SnpVerified.revocation_checked` says whether an ARK-signed CRL was among them;
        whether a missing CRL is acceptable is the policy's decision
        (`[snp] allow_missing_crl`), not this function's.
     9. The report's SIGNING_KEY says VCEK (0) or VLEK (1), matching the certificate kind.
    10. The chip certificate's key is ECDSA P-384 and verifies the report signature (R, S
        little-endian) over bytes 0x000..0x29F, with SHA-384.
    11. If the report's CPUID names a product, it is the certificate's product.
    12. For a VCEK, its hwID extension equals CHIP_ID (8 bytes on Turin).
    13. REPORTED_TCB equals the TCB the certificate was issued for (its blSPL, teeSPL,
        snpSPL, ucodeSPL and, on Turin, fmcSPL extensions).

    `trusted_products` replaces the pinned `AMD_PRODUCTS`, as go-sev-guest's
    `Options.TrustedRoots` does; it exists so tests can run every step against a fake PKI.
    Production callers leave it unset.
    """
    when = _as_datetime(now)
    products = AMD_PRODUCTS if trusted_products is None else trusted_products
    try:
        return _verify(report, chip_certificate, chain, when, crls, products)
    except QuoteVerificationError:
        raise
    except (ValueError, TypeError) as exc:
        # `cryptography` parses certificate fields lazily (public key, extensions, names):
        # a malformed VCEK can fail deep inside any step. It is bad evidence, never a bug.
        raise QuoteParseError(
            f"SEV-SNP: malformed certificate or report ({type(exc).__name__}: {exc})"
        ) from None


def _verify(
    report: bytes,
    chip_certificate: bytes,
    chain: bytes | None,
    when: datetime,
    crls: Sequence[bytes],
    products: Mapping[str, AmdProductRoots],
) -> SnpVerified:
    # 1. Parse.
    parsed = parse_snp_report(report)
    chip = _load_certificate(chip_certificate, "the chip certificate")

    # 2. Product and key kind.
    product, kind = _identify(chip, products)
    ark = _load_certificate(product.ark_der, f"the pinned ARK-{product.name}")
    if kind == "vcek":
        signer_der, signer_name = product.ask_der, "ASK"
    else:
        if product.asvk_der is None:
            raise _fail(f"no ASVK is pinned for {product.name}: its VLEKs cannot be verified")
        signer_der, signer_name = product.asvk_der, "ASVK"
    signer = _load_certificate(signer_der, f"the pinned {product.name} {signer_name}")

    # 3. A supplied chain may only repeat the pins.
    if chain is not None:
        _check_supplied_chain(_load_chain(chain), product, products)

    # 4-6. Signatures along the chain.
    _check_signed_by(ark, ark, f"ARK-{product.name}")
    _check_signed_by(signer, ark, f"the {signer_name}")
    _check_signed_by(chip, signer, f"the {kind.upper()}")

    # 7. Validity periods.
    _check_validity(ark, "ARK", when)
    _check_validity(signer, signer_name, when)
    _check_validity(chip, kind.upper(), when)

    # 8. Revocation.
    revocation_checked = _check_crls(crls, ark, signer, chip, signer_name, when)

    # 9. The report names the kind of key that signed it.
    expected_signing_key = SIGNING_KEY_VCEK if kind == "vcek" else SIGNING_KEY_VLEK
    if parsed.signing_key != expected_signing_key:
        names = {SIGNING_KEY_VCEK: "VCEK", SIGNING_KEY_VLEK: "VLEK"}
        claimed = names.get(parsed.signing_key, "no key")
        raise _fail(
            f"signing key mismatch: the report says it is signed by the {claimed} "
            f"(SIGNING_KEY={parsed.signing_key}) but the certificate is a {kind.upper()}"
        )

    # 10. The report signature.
    if parsed.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise _fail(f"signature algorithm {parsed.signature_algo} is not ECDSA P-384 SHA-384")
    key = chip.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise _fail(f"the {kind.upper()} key is not ECDSA P-384")
    signature = encode_dss_signature(
        int.from_bytes(parsed.signature_r, "little"), int.from_bytes(parsed.signature_s, "little")
    )
    try:
        key.verify(signature, parsed.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise _fail(f"report signature does not verify with the {kind.upper()}") from None

    # 11. The report's own idea of its processor.
    cpuid_product = parsed.cpuid_product
    if cpuid_product is not None and cpuid_product != product.name:
        raise _fail(f"the report's CPUID names {cpuid_product}, the certificate {product.name}")
    verified = parsed.for_product(product.name)

    # 12. Chip ID (VCEK only: a VLEK is not bound to one chip).
    if kind == "vcek":
        _check_chip_id(verified, chip, product.name)

    # 13. The TCB the certificate was issued for.
    certified = _certified_tcb(chip, product.name)
    if certified.raw != verified.reported_tcb.raw:
        raise _fail(
            f"reported TCB does not match the {kind.upper()}: report "
            f"{verified.reported_tcb.describe()}, certificate {certified.describe()}"
        )
    return SnpVerified(
        report=verified,
        product=product.name,
        key_kind=kind,
        revocation_checked=revocation_checked,
    )


__all__ = ["KeyKind", "SnpVerified", "verify_snp"]
