"""Parse (and re-serialise) Intel TDX DCAP quotes, versions 4 and 5, from untrusted bytes.

Client side: this module imports nothing from the server or the TEE providers. It follows
`sgx_quote` exactly and reuses its pieces rather than restating them: the 48-byte header
table and `QuoteHeader`, the SGX REPORT table (the QE report inside the certification data
is an SGX REPORT), the field codec and `_pem_certificates`. Each TD report layout is
described ONCE by a declarative `_Field` table that drives both parsing and serialising,
so the two cannot disagree; the tests check `parse_tdx_quote(b).to_bytes() == b` on every
real TDX quote of the shared vectors.

Parsing does not make a quote trustworthy (that is `attestation.intel.dcap`'s job: dcap-qvl
verifies TDX quotes too); it gives the verifier typed fields (MRTD, RTMRs, TD attributes,
...) to compare with a `TdxPolicy` after dcap-qvl accepted the bytes. Any malformed input
raises `QuoteParseError` and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final

from blindinfer.attestation.intel.sgx_quote import (
    ATT_KEY_TYPE_ECDSA_P256,
    ATTESTATION_KEY_SIZE,
    HEADER_FIELDS,
    HEADER_SIZE,
    MAX_CERT_DATA_SIZE,
    MAX_QUOTE_SIZE,
    REPORT_BODY_FIELDS,
    REPORT_BODY_SIZE,
    SIGNATURE_SIZE,
    QuoteHeader,
    SgxReportBody,
    encode_cert_tail,
    parse_cert_tail,
    pck_chain,
)
from blindinfer.attestation.layout import Field as _Field
from blindinfer.attestation.layout import check_fields as _check_fields
from blindinfer.attestation.layout import check_table as _check_table
from blindinfer.attestation.layout import decode as _decode
from blindinfer.attestation.layout import encode as _encode
from blindinfer.attestation.layout import raw as _b
from blindinfer.errors import QuoteParseError

__all__ = [
    "BODY_TYPE_TD10",
    "BODY_TYPE_TD15",
    "CERT_DATA_TYPE_QE_REPORT",
    "MAX_CERT_DATA_SIZE",
    "MAX_QUOTE_SIZE",
    "QUOTE_VERSION_TDX_V4",
    "QUOTE_VERSION_TDX_V5",
    "TD_ATTR_DEBUG",
    "TD_ATTR_SEPT_VE_DISABLE",
    "TD_REPORT10_FIELDS",
    "TD_REPORT10_SIZE",
    "TD_REPORT15_FIELDS",
    "TD_REPORT15_SIZE",
    "TEE_TYPE_TDX",
    "QeReportCertificationData",
    "QuoteHeader",
    "TdReportBody",
    "TdxQuote",
    "TdxQuoteSignatureData",
    "parse_tdx_quote",
]

QUOTE_VERSION_TDX_V4: Final = 4
QUOTE_VERSION_TDX_V5: Final = 5
TEE_TYPE_TDX: Final = 0x81

BODY_TYPE_SGX: Final = 1
BODY_TYPE_TD10: Final = 2
BODY_TYPE_TD15: Final = 3
BODY_TYPE_TD15_EX: Final = 4
"""Refused: dcap-qvl knows a 'TD 1.5ex' body, but its byte layout is not confirmed here."""

CERT_DATA_TYPE_QE_REPORT: Final = 6
"""Certification data type 6: the QE report certification data (which wraps type 5)."""

TD_ATTR_DEBUG: Final = 1 << 0
"""TD_ATTRIBUTES.DEBUG (byte 0, bit 0): the host can read and write the TD's memory."""

TD_ATTR_SEPT_VE_DISABLE: Final = 1 << 28
"""TD_ATTRIBUTES.SEPT_VE_DISABLE: without it the host can inject #VE via EPT violations."""

# TDX TD report body, TDX 1.0 (Intel TDX DCAP Quoting Library API, "TD Quote Body").
TD_REPORT10_FIELDS: Final = (
    _b("tee_tcb_svn", 0, 16),
    _b("mrseam", 16, 48),
    _b("mrsignerseam", 64, 48),
    _b("seam_attributes", 112, 8),
    _b("td_attributes", 120, 8),
    _b("xfam", 128, 8),
    _b("mrtd", 136, 48),
    _b("mrconfigid", 184, 48),
    _b("mrowner", 232, 48),
    _b("mrownerconfig", 280, 48),
    _b("rtmr0", 328, 48),
    _b("rtmr1", 376, 48),
    _b("rtmr2", 424, 48),
    _b("rtmr3", 472, 48),
    _b("report_data", 520, 64),
)
TD_REPORT10_SIZE: Final = _check_table(TD_REPORT10_FIELDS, 584)

# TDX 1.5 appends the second TEE TCB SVN and the service TD's measurement.
TD_REPORT15_FIELDS: Final = (
    *TD_REPORT10_FIELDS,
    _b("tee_tcb_svn2", 584, 16),
    _b("mrservicetd", 600, 48),
)
TD_REPORT15_SIZE: Final = _check_table(TD_REPORT15_FIELDS, 648)

_BODY_SIZES: Final = {BODY_TYPE_TD10: TD_REPORT10_SIZE, BODY_TYPE_TD15: TD_REPORT15_SIZE}

# Quote v5 body descriptor between the header and the body: type u16, size u32.
_V5_DESCRIPTOR: Final = struct.Struct("<HI")

# Signature data (after its u32 length): quote signature, attestation key, then the
# certification data as type u16 + size u32 + that many bytes.
_TDX_SIG_FIXED_HEAD: Final = (
    _b("signature", 0, SIGNATURE_SIZE),
    _b("attestation_key", 64, ATTESTATION_KEY_SIZE),
)
_TDX_SIG_FIXED_HEAD_SIZE: Final = _check_table(_TDX_SIG_FIXED_HEAD, 128)
_CERT_HEADER: Final = struct.Struct("<HI")

# Type-6 certification data: the QE REPORT and its PCK signature, then the same variable
# part as a v3 quote's signature data (`sgx_quote._SIG_VARIABLE`: QE auth data, type-5
# certification data type and the PEM chain).
_QE_CERT_FIXED_HEAD: Final = (
    _b("qe_report", 0, REPORT_BODY_SIZE),
    _b("qe_report_signature", REPORT_BODY_SIZE, SIGNATURE_SIZE),
)
_QE_CERT_FIXED_HEAD_SIZE: Final = _check_table(_QE_CERT_FIXED_HEAD, 448)


@dataclass(frozen=True, slots=True, kw_only=True)
class TdReportBody:
    """A TD report body: the TD's measurements, attributes and report_data.

    TDX 1.0 bodies (584 bytes) leave `tee_tcb_svn2` and `mrservicetd` as None; TDX 1.5
    bodies (648 bytes) carry both, so the layout can be told apart from the object alone.
    """

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mrservicetd: bytes | None = None

    def __post_init__(self) -> None:
        if (self.tee_tcb_svn2 is None) != (self.mrservicetd is None):
            raise ValueError("tee_tcb_svn2 and mrservicetd are both set (TD 1.5) or both None")
        _check_fields(self._table(), self)

    def _table(self) -> tuple[_Field, ...]:
        return TD_REPORT15_FIELDS if self.is_td15 else TD_REPORT10_FIELDS

    def to_bytes(self) -> bytes:
        return _encode(self._table(), self)

    @property
    def is_td15(self) -> bool:
        """A TDX 1.5 body (it has the second TCB SVN and MRSERVICETD)."""
        return self.tee_tcb_svn2 is not None

    @property
    def td_attributes_int(self) -> int:
        """TD_ATTRIBUTES as the little-endian u64 that Intel's bit numbers refer to."""
        return int.from_bytes(self.td_attributes, "little")

    @property
    def debug(self) -> bool:
        """A debug TD's memory is open to the host: never send it secrets."""
        return bool(self.td_attributes[0] & TD_ATTR_DEBUG)

    @property
    def sept_ve_disable(self) -> bool:
        """Set when the TD cannot be made to take #VE on EPT violations by the host."""
        return bool(self.td_attributes_int & TD_ATTR_SEPT_VE_DISABLE)


@dataclass(frozen=True, slots=True, kw_only=True)
class QeReportCertificationData:
    """Type-6 certification data: QE report, its PCK signature, QE auth data, PCK chain.

    The same fields, in the same order, as the tail of a v3 quote's signature data.
    """

    qe_report: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_data_type: int
    cert_data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.qe_report, SgxReportBody):
            raise ValueError("qe_report must be an SgxReportBody")
        sig = self.qe_report_signature
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_SIZE:
            raise ValueError(f"qe_report_signature must be {SIGNATURE_SIZE} bytes")
        if not isinstance(self.qe_auth_data, bytes) or len(self.qe_auth_data) > 0xFFFF:
            raise ValueError("qe_auth_data must be at most 65535 bytes")
        if not isinstance(self.cert_data_type, int) or not 0 <= self.cert_data_type <= 0xFFFF:
            raise ValueError("cert_data_type must be a u16")
        if not isinstance(self.cert_data, bytes) or len(self.cert_data) > MAX_CERT_DATA_SIZE:
            raise ValueError(f"cert_data must be at most {MAX_CERT_DATA_SIZE} bytes")

    def to_bytes(self) -> bytes:
        """The type-6 payload, without its own type and size."""
        values: dict[str, Any] = {
            "qe_report": self.qe_report.to_bytes(),
            "qe_report_signature": self.qe_report_signature,
        }
        return b"".join(values[f.name] for f in _QE_CERT_FIXED_HEAD) + encode_cert_tail(self)

    @property
    def certificates(self) -> tuple[bytes, ...]:
        """The PCK chain (leaf, intermediate CA, root) as DER, from type-5 data."""
        return pck_chain(self.cert_data_type, self.cert_data)


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxQuoteSignatureData:
    """ECDSA quote signature, attestation key and the type-6 QE certification data."""

    signature: bytes
    attestation_key: bytes
    qe_report_certification: QeReportCertificationData
    cert_data_type: int = CERT_DATA_TYPE_QE_REPORT

    def __post_init__(self) -> None:
        _check_fields(_TDX_SIG_FIXED_HEAD, self)
        if self.cert_data_type != CERT_DATA_TYPE_QE_REPORT:
            raise ValueError(f"cert_data_type must be {CERT_DATA_TYPE_QE_REPORT}")
        if not isinstance(self.qe_report_certification, QeReportCertificationData):
            raise ValueError("qe_report_certification must be QeReportCertificationData")

    def to_bytes(self) -> bytes:
        """Signature data without its u32 length prefix."""
        inner = self.qe_report_certification.to_bytes()
        return b"".join(
            (
                _encode(_TDX_SIG_FIXED_HEAD, self),
                _CERT_HEADER.pack(self.cert_data_type, len(inner)),
                inner,
            )
        )

    @property
    def certificates(self) -> tuple[bytes, ...]:
        """The PCK chain (leaf, intermediate CA, root) as DER, from the wrapped type 5."""
        return self.qe_report_certification.certificates


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxQuote:
    """A parsed TDX quote v4 or v5; `raw` is exactly the bytes it was parsed from.

    `body_type` is 2 (TD 1.0) or 3 (TD 1.5); a v4 quote has no descriptor and is always
    TD 1.0. `trailing` holds the bytes after the signature data: TDX guests hand quotes
    out in fixed-size, zero-padded buffers (GCP's are 8000 bytes) and dcap-qvl ignores
    what follows the signature data. Those bytes are neither signed nor interpreted; they
    are kept only so that `to_bytes()` reproduces the input exactly.
    """

    header: QuoteHeader
    body_type: int
    body: TdReportBody
    signature: TdxQuoteSignatureData
    trailing: bytes = b""
    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        version = self.header.version
        if version == QUOTE_VERSION_TDX_V4 and self.body_type != BODY_TYPE_TD10:
            raise ValueError("a v4 quote always carries a TD 1.0 body (body type 2)")
        if version not in (QUOTE_VERSION_TDX_V4, QUOTE_VERSION_TDX_V5):
            raise ValueError("a TDX quote is version 4 or 5")
        if self.body_type not in _BODY_SIZES:
            raise ValueError("body_type must be 2 (TD 1.0) or 3 (TD 1.5)")
        if self.body.is_td15 != (self.body_type == BODY_TYPE_TD15):
            raise ValueError(f"body layout does not match body type {self.body_type}")
        if not isinstance(self.trailing, bytes):
            raise ValueError("trailing must be bytes")

    @classmethod
    def assemble(
        cls,
        header: QuoteHeader,
        body: TdReportBody,
        signature: TdxQuoteSignatureData,
        *,
        trailing: bytes = b"",
    ) -> TdxQuote:
        """A quote from its parts (for quote builders); `raw` is their serialisation."""
        body_type = BODY_TYPE_TD15 if body.is_td15 else BODY_TYPE_TD10
        draft = cls(
            header=header,
            body_type=body_type,
            body=body,
            signature=signature,
            trailing=trailing,
            raw=b"",
        )
        return cls(
            header=header,
            body_type=body_type,
            body=body,
            signature=signature,
            trailing=trailing,
            raw=draft.to_bytes(),
        )

    def _signed_part(self) -> bytes:
        body = self.body.to_bytes()
        if self.header.version == QUOTE_VERSION_TDX_V4:
            return self.header.to_bytes() + body
        return self.header.to_bytes() + _V5_DESCRIPTOR.pack(self.body_type, len(body)) + body

    def to_bytes(self) -> bytes:
        """Serialise from the fields (equals `raw` for parsed quotes)."""
        sig = self.signature.to_bytes()
        return b"".join((self._signed_part(), struct.pack("<I", len(sig)), sig, self.trailing))

    @property
    def signed_size(self) -> int:
        """Length of the signed prefix: header (+ v5 descriptor) + body."""
        descriptor = 0 if self.header.version == QUOTE_VERSION_TDX_V4 else _V5_DESCRIPTOR.size
        return HEADER_SIZE + descriptor + _BODY_SIZES[self.body_type]

    @property
    def signed_bytes(self) -> bytes:
        """What the attestation key signed: header, the v5 body descriptor, and the body."""
        return self.raw[: self.signed_size]

    @property
    def is_td15(self) -> bool:
        return self.body_type == BODY_TYPE_TD15


def _parse_qe_report_certification(data: memoryview) -> QeReportCertificationData:
    """Parse type-6 certification data, which must be consumed exactly."""
    if len(data) < _QE_CERT_FIXED_HEAD_SIZE:
        raise QuoteParseError(
            f"QE report certification data is {len(data)} bytes, shorter than its fixed "
            f"{_QE_CERT_FIXED_HEAD_SIZE}-byte part"
        )
    values = _decode(_QE_CERT_FIXED_HEAD, data, 0)
    values["qe_report"] = SgxReportBody(**_decode(REPORT_BODY_FIELDS, values["qe_report"], 0))
    parse_cert_tail(data, _QE_CERT_FIXED_HEAD_SIZE, values, "QE report certification data")
    return QeReportCertificationData(**values)


def _parse_signature_data(data: memoryview) -> TdxQuoteSignatureData:
    """Parse the signature data (without its length), which must be consumed exactly."""
    head = _TDX_SIG_FIXED_HEAD_SIZE + _CERT_HEADER.size
    if len(data) < head:
        raise QuoteParseError(
            f"signature data is {len(data)} bytes, shorter than its fixed {head}-byte part"
        )
    values = _decode(_TDX_SIG_FIXED_HEAD, data, 0)
    cert_type, cert_size = _CERT_HEADER.unpack_from(data, _TDX_SIG_FIXED_HEAD_SIZE)
    if cert_type != CERT_DATA_TYPE_QE_REPORT:
        raise QuoteParseError(
            f"certification data type {cert_type} is not {CERT_DATA_TYPE_QE_REPORT} "
            "(QE report certification data)"
        )
    if cert_size > MAX_CERT_DATA_SIZE:
        raise QuoteParseError(
            f"certification data of {cert_size} bytes exceeds {MAX_CERT_DATA_SIZE} bytes"
        )
    rest = len(data) - head
    if cert_size != rest:
        raise QuoteParseError(
            f"certification data size {cert_size} does not match the {rest} bytes "
            "left in the signature data"
        )
    inner = _parse_qe_report_certification(data[head:])
    return TdxQuoteSignatureData(**values, qe_report_certification=inner)


def _parse(raw: bytes) -> TdxQuote:
    if len(raw) < HEADER_SIZE:
        raise QuoteParseError(f"quote is {len(raw)} bytes, shorter than its header")
    header = QuoteHeader(**_decode(HEADER_FIELDS, raw, 0))
    if header.version not in (QUOTE_VERSION_TDX_V4, QUOTE_VERSION_TDX_V5):
        raise QuoteParseError(f"quote version {header.version} is not 4 or 5 (TDX DCAP)")
    if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise QuoteParseError(f"attestation key type {header.att_key_type} is not 2 (ECDSA-P256)")
    if header.tee_type != TEE_TYPE_TDX:
        raise QuoteParseError(f"TEE type {header.tee_type:#x} is not 0x81 (TDX)")
    pos = HEADER_SIZE
    body_type = BODY_TYPE_TD10
    if header.version == QUOTE_VERSION_TDX_V5:
        if len(raw) < pos + _V5_DESCRIPTOR.size:
            raise QuoteParseError("quote v5 ends inside its body type and size")
        body_type, body_size = _V5_DESCRIPTOR.unpack_from(raw, pos)
        pos += _V5_DESCRIPTOR.size
        if body_type == BODY_TYPE_SGX:
            raise QuoteParseError("quote v5 body type 1 is an SGX enclave report, not a TD")
        if body_type == BODY_TYPE_TD15_EX:
            raise QuoteParseError(
                "quote v5 body type 4 (TD 1.5ex) is not supported: its layout is not confirmed"
            )
        if body_type not in _BODY_SIZES:
            raise QuoteParseError(f"quote v5 body type {body_type} is unknown (2 or 3 expected)")
        if body_size != _BODY_SIZES[body_type]:
            raise QuoteParseError(
                f"quote v5 body type {body_type} is {_BODY_SIZES[body_type]} bytes, not {body_size}"
            )
    table = TD_REPORT15_FIELDS if body_type == BODY_TYPE_TD15 else TD_REPORT10_FIELDS
    body_size = _BODY_SIZES[body_type]
    if len(raw) < pos + body_size + 4:
        raise QuoteParseError(
            f"quote is {len(raw)} bytes, shorter than header + body + length "
            f"({pos + body_size + 4})"
        )
    body = TdReportBody(**_decode(table, raw, pos))
    pos += body_size
    (sig_len,) = struct.unpack_from("<I", raw, pos)
    pos += 4
    if sig_len > len(raw) - pos:
        raise QuoteParseError(
            f"signature data length {sig_len} exceeds the {len(raw) - pos} bytes left"
        )
    signature = _parse_signature_data(memoryview(raw)[pos : pos + sig_len])
    return TdxQuote(
        header=header,
        body_type=body_type,
        body=body,
        signature=signature,
        trailing=raw[pos + sig_len :],
        raw=raw,
    )


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Parse an Intel TDX ECDSA quote v4 or v5; raise `QuoteParseError` on anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise QuoteParseError(f"quote must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_QUOTE_SIZE:
        raise QuoteParseError(f"quote of {len(raw)} bytes exceeds {MAX_QUOTE_SIZE} bytes")
    try:
        return _parse(raw)
    except (ValueError, struct.error) as exc:  # a dataclass check: the parser missed a case
        raise QuoteParseError(f"malformed TDX quote: {exc}") from None
