"""Parse (and re-serialise) SGX DCAP quotes, version 3, from untrusted bytes.

Client side: this module imports nothing from the server or the TEE providers. Every
fixed-size structure is described ONCE by a declarative table of `_Field`s that drives
both parsing and serialising, so the two can never disagree; the tests check that
`parse_sgx_quote(b).to_bytes() == b` on real and simulated quotes.

Parsing does not make a quote trustworthy (that is `attestation.intel.dcap`'s job); it gives
the verifier typed fields to compare against a policy after dcap-qvl accepted the bytes.
Any malformed input raises `QuoteParseError` and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Final

from blindinfer.attestation.layout import check_fields as _check_fields
from blindinfer.attestation.layout import check_table as _check_table
from blindinfer.attestation.layout import decode as _decode
from blindinfer.attestation.layout import encode as _encode
from blindinfer.attestation.layout import raw as _b
from blindinfer.attestation.layout import uint as _u
from blindinfer.errors import QuoteParseError

MAX_QUOTE_SIZE: Final = 1024 * 1024
"""Larger inputs are refused before any parsing: a real v3 quote is about 5 KiB."""

MAX_CERT_DATA_SIZE: Final = 64 * 1024
"""A PCK chain is three certificates (about 3.5 KiB of PEM)."""

QUOTE_VERSION_SGX: Final = 3
ATT_KEY_TYPE_ECDSA_P256: Final = 2
TEE_TYPE_SGX: Final = 0
CERT_DATA_TYPE_PCK_CHAIN: Final = 5
QE_AUTH_DATA_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
ATTESTATION_KEY_SIZE: Final = 64

ATTR_FLAG_INIT: Final = 0x01
ATTR_FLAG_DEBUG: Final = 0x02
ATTR_FLAG_MODE64BIT: Final = 0x04


# Quote header (Intel SGX ECDSA Quote Library reference, "Quote Header").
HEADER_FIELDS: Final = (
    _u("version", 0, 2),
    _u("att_key_type", 2, 2),
    _u("tee_type", 4, 4),
    _u("qe_svn", 8, 2),
    _u("pce_svn", 10, 2),
    _b("qe_vendor_id", 12, 16),
    _b("user_data", 28, 20),
)
HEADER_SIZE: Final = _check_table(HEADER_FIELDS, 48)

# SGX REPORT body (sgx_report_body_t); reserved regions are kept so bytes round-trip.
REPORT_BODY_FIELDS: Final = (
    _b("cpusvn", 0, 16),
    _u("miscselect", 16, 4),
    _b("reserved1", 20, 28),
    _b("attributes", 48, 16),
    _b("mrenclave", 64, 32),
    _b("reserved2", 96, 32),
    _b("mrsigner", 128, 32),
    _b("reserved3", 160, 32),
    _b("config_id", 192, 64),
    _u("isvprodid", 256, 2),
    _u("isvsvn", 258, 2),
    _u("config_svn", 260, 2),
    _b("reserved4", 262, 42),
    _b("isv_family_id", 304, 16),
    _b("report_data", 320, 64),
)
REPORT_BODY_SIZE: Final = _check_table(REPORT_BODY_FIELDS, 384)

SIGNED_SIZE: Final = HEADER_SIZE + REPORT_BODY_SIZE
"""The quote signature covers header + report body: bytes [0, 432)."""

# Quote signature data, after its u32 length. Fixed fields are (name, size); the
# variable ones carry their own little-endian length prefix of the given width.
_SIG_FIXED_HEAD: Final = (
    _b("signature", 0, SIGNATURE_SIZE),
    _b("attestation_key", 64, ATTESTATION_KEY_SIZE),
    _b("qe_report", 128, REPORT_BODY_SIZE),
    _b("qe_report_signature", 512, SIGNATURE_SIZE),
)
_SIG_FIXED_HEAD_SIZE: Final = _check_table(_SIG_FIXED_HEAD, 576)
_SIG_VARIABLE: Final = (
    # (name, struct format, True: a length prefix followed by that many bytes / False: a value)
    ("qe_auth_data", "<H", True),
    ("cert_data_type", "<H", False),
    ("cert_data", "<I", True),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    def __post_init__(self) -> None:
        _check_fields(HEADER_FIELDS, self)

    def to_bytes(self) -> bytes:
        return _encode(HEADER_FIELDS, self)


_Z28, _Z32, _Z42 = bytes(28), bytes(32), bytes(42)


@dataclass(frozen=True, slots=True, kw_only=True)
class SgxReportBody:
    """An SGX REPORT body (384 bytes): the enclave's measurements and report_data."""

    cpusvn: bytes
    miscselect: int
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    config_id: bytes
    isvprodid: int
    isvsvn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes
    reserved1: bytes = _Z28
    reserved2: bytes = _Z32
    reserved3: bytes = _Z32
    reserved4: bytes = _Z42

    def __post_init__(self) -> None:
        _check_fields(REPORT_BODY_FIELDS, self)

    def to_bytes(self) -> bytes:
        return _encode(REPORT_BODY_FIELDS, self)

    @property
    def flags(self) -> int:
        """ATTRIBUTES.FLAGS (u64): INIT, DEBUG, MODE64BIT, PROVISIONKEY, ..."""
        return int.from_bytes(self.attributes[:8], "little")

    @property
    def xfrm(self) -> int:
        """ATTRIBUTES.XFRM (u64): the CPU extended features the enclave may use."""
        return int.from_bytes(self.attributes[8:], "little")

    @property
    def debug(self) -> bool:
        """A debug enclave's memory is readable by the host: never trust its secrets."""
        return bool(self.flags & ATTR_FLAG_DEBUG)


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]*?)-----END CERTIFICATE-----")
_PEM_FILLER = re.compile(rb"[\s\x00]*")


def _pem_certificates(data: bytes) -> tuple[bytes, ...]:
    """DER of every PEM certificate in `data`; only whitespace/NUL may lie between them."""
    ders: list[bytes] = []
    pos = 0
    for m in _PEM_CERT.finditer(data):
        if not _PEM_FILLER.fullmatch(data, pos, m.start()):
            raise QuoteParseError("certification data: unexpected bytes around a certificate")
        try:
            der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise QuoteParseError(f"certification data: bad base64 in PEM: {e}") from None
        if not der:
            raise QuoteParseError("certification data: empty PEM certificate")
        ders.append(der)
        pos = m.end()
    if not _PEM_FILLER.fullmatch(data, pos):
        raise QuoteParseError("certification data: unexpected bytes after the certificates")
    if not ders:
        raise QuoteParseError("certification data: no PEM certificate found")
    return tuple(ders)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteSignatureData:
    """ECDSA quote signature, attestation key, QE report and PCK certification data."""

    signature: bytes
    attestation_key: bytes
    qe_report: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_data_type: int
    cert_data: bytes

    def __post_init__(self) -> None:
        for name, size in (
            ("signature", SIGNATURE_SIZE),
            ("attestation_key", ATTESTATION_KEY_SIZE),
            ("qe_report_signature", SIGNATURE_SIZE),
        ):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"{name} must be {size} bytes")
        if not isinstance(self.qe_auth_data, bytes) or len(self.qe_auth_data) > 0xFFFF:
            raise ValueError("qe_auth_data must be at most 65535 bytes")
        if not 0 <= self.cert_data_type <= 0xFFFF:
            raise ValueError("cert_data_type must be a u16")
        if not isinstance(self.cert_data, bytes) or len(self.cert_data) > MAX_CERT_DATA_SIZE:
            raise ValueError(f"cert_data must be at most {MAX_CERT_DATA_SIZE} bytes")

    def to_bytes(self) -> bytes:
        """Signature data without its u32 length prefix."""
        values: dict[str, Any] = {
            "signature": self.signature,
            "attestation_key": self.attestation_key,
            "qe_report": self.qe_report.to_bytes(),
            "qe_report_signature": self.qe_report_signature,
        }
        return b"".join(values[f.name] for f in _SIG_FIXED_HEAD) + encode_cert_tail(self)

    @property
    def certificates(self) -> tuple[bytes, ...]:
        """The PCK chain (leaf, intermediate CA, root) as DER, from type-5 data."""
        return pck_chain(self.cert_data_type, self.cert_data)


def encode_cert_tail(obj: Any) -> bytes:
    """The variable tail shared by v3 signature data and TDX type-6 data: QE auth data,
    certification data type, certification data (`_SIG_VARIABLE`)."""
    parts = []
    for name, fmt, prefixed in _SIG_VARIABLE:
        value = getattr(obj, name)
        parts.append(struct.pack(fmt, len(value)) + value if prefixed else struct.pack(fmt, value))
    return b"".join(parts)


def parse_cert_tail(data: memoryview, pos: int, values: dict[str, Any], where: str) -> None:
    """Reads `_SIG_VARIABLE` from `pos` into `values`; the data must end exactly there."""
    for name, fmt, prefixed in _SIG_VARIABLE:
        width = struct.calcsize(fmt)
        if len(data) - pos < width:
            raise QuoteParseError(f"{where} ends inside the {name} field")
        (number,) = struct.unpack_from(fmt, data, pos)
        pos += width
        if not prefixed:
            values[name] = number
            continue
        if name == "cert_data" and number > MAX_CERT_DATA_SIZE:
            raise QuoteParseError(
                f"certification data of {number} bytes exceeds {MAX_CERT_DATA_SIZE} bytes"
            )
        if number > len(data) - pos:
            raise QuoteParseError(
                f"{name} length {number} exceeds the {len(data) - pos} bytes remaining"
            )
        values[name] = bytes(data[pos : pos + number])
        pos += number
    if pos != len(data):
        raise QuoteParseError(f"{len(data) - pos} trailing bytes after the {where}")


def pck_chain(cert_data_type: int, cert_data: bytes) -> tuple[bytes, ...]:
    """The PCK chain as DER from type-5 certification data."""
    if cert_data_type != CERT_DATA_TYPE_PCK_CHAIN:
        raise QuoteParseError(
            f"certification data type {cert_data_type} carries no PEM chain "
            f"(only type {CERT_DATA_TYPE_PCK_CHAIN} is supported)"
        )
    return _pem_certificates(cert_data)


@dataclass(frozen=True, slots=True, kw_only=True)
class SgxQuote:
    """A parsed v3 quote; `raw` is exactly the bytes it was parsed from."""

    header: QuoteHeader
    body: SgxReportBody
    signature: QuoteSignatureData
    raw: bytes = field(repr=False)

    @classmethod
    def assemble(
        cls, header: QuoteHeader, body: SgxReportBody, signature: QuoteSignatureData
    ) -> SgxQuote:
        """A quote from its parts (for quote builders); `raw` is their serialisation."""
        draft = cls(header=header, body=body, signature=signature, raw=b"")
        return cls(header=header, body=body, signature=signature, raw=draft.to_bytes())

    def to_bytes(self) -> bytes:
        """Serialise from the fields (equals `raw` for parsed quotes)."""
        sig = self.signature.to_bytes()
        return b"".join(
            (self.header.to_bytes(), self.body.to_bytes(), struct.pack("<I", len(sig)), sig)
        )

    @property
    def signed_bytes(self) -> bytes:
        """Header + report body: what the attestation key signed."""
        return self.raw[:SIGNED_SIZE]


def _parse_signature_data(data: memoryview) -> QuoteSignatureData:
    if len(data) < _SIG_FIXED_HEAD_SIZE:
        raise QuoteParseError(
            f"signature data is {len(data)} bytes, shorter than its fixed "
            f"{_SIG_FIXED_HEAD_SIZE}-byte part"
        )
    values = _decode(_SIG_FIXED_HEAD, data, 0)
    values["qe_report"] = SgxReportBody(**_decode(REPORT_BODY_FIELDS, values["qe_report"], 0))
    parse_cert_tail(data, _SIG_FIXED_HEAD_SIZE, values, "certification data")
    return QuoteSignatureData(**values)


def parse_sgx_quote(data: bytes) -> SgxQuote:
    """Parse an SGX ECDSA quote v3; raise `QuoteParseError` on anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise QuoteParseError(f"quote must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_QUOTE_SIZE:
        raise QuoteParseError(f"quote of {len(raw)} bytes exceeds {MAX_QUOTE_SIZE} bytes")
    if len(raw) < SIGNED_SIZE + 4:
        raise QuoteParseError(
            f"quote is {len(raw)} bytes, shorter than header + report body + length "
            f"({SIGNED_SIZE + 4})"
        )
    header = QuoteHeader(**_decode(HEADER_FIELDS, raw, 0))
    if header.version != QUOTE_VERSION_SGX:
        raise QuoteParseError(f"quote version {header.version} is not 3 (SGX DCAP)")
    if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise QuoteParseError(f"attestation key type {header.att_key_type} is not 2 (ECDSA-P256)")
    if header.tee_type != TEE_TYPE_SGX:
        raise QuoteParseError(f"TEE type {header.tee_type:#x} is not 0 (SGX)")
    body = SgxReportBody(**_decode(REPORT_BODY_FIELDS, raw, HEADER_SIZE))
    (sig_len,) = struct.unpack_from("<I", raw, SIGNED_SIZE)
    rest = len(raw) - SIGNED_SIZE - 4
    if sig_len > rest:
        raise QuoteParseError(f"signature data length {sig_len} exceeds the {rest} bytes left")
    if sig_len < rest:
        raise QuoteParseError(f"{rest - sig_len} trailing bytes after the signature data")
    signature = _parse_signature_data(memoryview(raw)[SIGNED_SIZE + 4 :])
    return SgxQuote(header=header, body=body, signature=signature, raw=raw)
