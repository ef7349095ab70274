"""Parse (and re-serialise) an NVIDIA GPU attestation report from untrusted bytes.

Client side: this module imports nothing from the server, the TEE providers, the store
or the runtime. What NVIDIA's tools call the "attestation report" of an H100 in
confidential-computing mode is two DMTF SPDM 1.1 messages back to back, as the GPU
driver captured them (NVIDIA nvtrust `local_gpu_verifier`, and the confidential-containers
trustee verifier, read it the same way; the layout here was learnt from both and from the
DMTF SPDM 1.1 specification, DSP0274):

    GET_MEASUREMENTS request (37 bytes)     version 0x11, code 0xE0, param1 (bit 0: sign),
                                            param2 (0xFF: all blocks), requester nonce (32),
                                            slot id
    MEASUREMENTS response                   version, code 0x60, param1, param2,
                                            number of blocks (u8), record length (u24 LE),
                                            measurement record, responder nonce (32),
                                            opaque length (u16 LE), opaque data,
                                            signature (ECDSA P-384, r || s, 96 bytes),
                                            then up to 4 zero bytes of padding (below)

Every multi-byte integer is little-endian. Each measurement block is (index u8,
measurement specification u8 = 1 for DMTF, size u16) followed by a DMTF measurement
(value type u8, value size u16, value). NVIDIA's opaque data is a list of
(type u16, size u16, value) entries: driver version, VBIOS version, project, chip SKU,
firmware ID, ... (`OPAQUE_FIELD_NAMES`).

The signature covers the request and the response up to the signature (`signed_bytes`),
hashed with SHA-384: including the request is what binds the requester's nonce.

The signature starts right after the opaque data, as NVIDIA's verifier and trustee read it
(both take `SIGNATURE_SIZE` bytes at that offset and stop). Reports captured in a
Confidential Containers H100 deployment (driver 580.95.05) carry one zero byte after the
signature; it is outside what the GPU signed. Up to `MAX_TRAILING_PADDING` zero bytes are
therefore accepted and kept (`trailing_padding`, so `raw` still round-trips); anything else
after the signature (a non-zero byte, more padding, a short signature) is malformed.

Every fixed-size structure is described ONCE by a declarative table of `_Field`s that
drives parsing and serialising, so the two cannot disagree; lengths and counts in the
byte stream are derived from the fields when serialising, and the parser insists that
they are consistent, so `parse_nvidia_report(b).to_bytes() == b`. Parsing does not make
a report trustworthy (that is `attestation.nvidia`'s job). Malformed input raises
`QuoteParseError` and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from blindinfer.attestation.layout import Field as _Field
from blindinfer.attestation.layout import check_fields as _check_fields
from blindinfer.attestation.layout import check_table as _check_table
from blindinfer.attestation.layout import decode as _decode
from blindinfer.attestation.layout import encode as _encode
from blindinfer.attestation.layout import raw as _b
from blindinfer.attestation.layout import uint as _u
from blindinfer.errors import QuoteParseError

MAX_REPORT_SIZE: Final = 256 * 1024
"""Larger inputs are refused before parsing: an H100 report is about 4 KiB."""

SPDM_VERSION_1_1: Final = 0x11
SUPPORTED_SPDM_VERSIONS: Final = frozenset({SPDM_VERSION_1_1})
"""Only SPDM 1.1, what Hopper GPUs speak; 1.3 inserts a requester context, a new layout."""

SPDM_GET_MEASUREMENTS: Final = 0xE0
SPDM_MEASUREMENTS: Final = 0x60
NONCE_SIZE: Final = 32
SIGNATURE_SIZE: Final = 96
"""ECDSA P-384 signature as NVIDIA's GPUs write it: r and s, 48 bytes each, big-endian."""

MAX_TRAILING_PADDING: Final = 4
"""Zero bytes allowed after the signature (one seen from real H100s; never signed)."""

DMTF_MEASUREMENT_SPECIFICATION: Final = 0x01
REQUEST_PARAM1_SIGNATURE_REQUESTED: Final = 0x01
DMTF_VALUE_TYPE_RAW_BIT_STREAM: Final = 0x80
"""Bit 7 of a DMTF value type: set for a raw bit stream, clear for a digest."""

OPAQUE_FIELD_NAMES: Final[Mapping[int, str]] = {
    1: "cert_issuer_name",
    2: "cert_authority_key_identifier",
    3: "driver_version",
    4: "gpu_info",
    5: "sku",
    6: "vbios_version",
    7: "manufacturer_id",
    8: "tamper_detection",
    9: "smc",
    10: "vpr",
    11: "nvdec0_status",
    12: "msrscnt",
    13: "cprinfo",
    14: "board_id",
    15: "chip_sku",
    16: "chip_sku_mod",
    17: "project",
    18: "project_sku",
    19: "project_sku_mod",
    20: "fwid",
    21: "protected_pcie_status",
    22: "switch_pdi",
    23: "floorswept_ports",
    24: "position_id",
    25: "lock_switch_status",
    32: "gpu_link_conn",
    33: "sys_enable_status",
    34: "opaque_data_version",
    35: "chip_info",
    36: "feature_flag",
    255: "invalid",
}
"""NVIDIA's opaque field identifiers (nvtrust `OpaqueData.OPAQUE_DATA_TYPES`)."""

OPAQUE_DRIVER_VERSION: Final = 3
OPAQUE_VBIOS_VERSION: Final = 6
OPAQUE_MSRSCNT: Final = 12
OPAQUE_FWID: Final = 20
_OPAQUE_TEXT_TYPES: Final = frozenset({3, 11, 15, 16, 17, 18, 21, 35})
"""Fields that carry NUL-padded ASCII text (driver version, SKUs, project, status letters)."""
VBIOS_VERSION_SIZE: Final = 8
MSRSCNT_ENTRY_SIZE: Final = 4


# SPDM 1.1 GET_MEASUREMENTS request, as the driver recorded it (always with a nonce).
REQUEST_FIELDS: Final = (
    _u("spdm_version", 0, 1),
    _u("request_code", 1, 1),
    _u("param1", 2, 1),
    _u("param2", 3, 1),
    _b("nonce", 4, NONCE_SIZE),
    _u("slot_id_param", 36, 1),
)
REQUEST_SIZE: Final = _check_table(REQUEST_FIELDS, 37)

# SPDM 1.1 MEASUREMENTS response: the fixed part before the measurement record. The two
# counts are derived from `blocks` when serialising, so they are not dataclass fields.
RESPONSE_HEADER_FIELDS: Final = (
    _u("spdm_version", 0, 1),
    _u("response_code", 1, 1),
    _u("param1", 2, 1),
    _u("param2", 3, 1),
    _u("number_of_blocks", 4, 1),
    _u("measurement_record_length", 5, 3),
)
RESPONSE_HEADER_SIZE: Final = _check_table(RESPONSE_HEADER_FIELDS, 8)

# After the record: responder nonce, then the opaque data length (u16) and the data.
RESPONSE_NONCE_FIELDS: Final = (_b("nonce", 0, NONCE_SIZE), _u("opaque_length", 32, 2))
RESPONSE_NONCE_SIZE: Final = _check_table(RESPONSE_NONCE_FIELDS, 34)

# One measurement block's header; `measurement_size` is derived from the DMTF value.
BLOCK_HEADER_FIELDS: Final = (
    _u("index", 0, 1),
    _u("measurement_specification", 1, 1),
    _u("measurement_size", 2, 2),
)
BLOCK_HEADER_SIZE: Final = _check_table(BLOCK_HEADER_FIELDS, 4)

# The DMTF measurement inside a block; `value_size` is derived from the value.
DMTF_HEADER_FIELDS: Final = (_u("value_type", 0, 1), _u("value_size", 1, 2))
DMTF_HEADER_SIZE: Final = _check_table(DMTF_HEADER_FIELDS, 3)

# One opaque data entry's header; `size` is derived from the value.
OPAQUE_HEADER_FIELDS: Final = (_u("type", 0, 2), _u("size", 2, 2))
OPAQUE_HEADER_SIZE: Final = _check_table(OPAQUE_HEADER_FIELDS, 4)

MIN_REPORT_SIZE: Final = REQUEST_SIZE + RESPONSE_HEADER_SIZE + RESPONSE_NONCE_SIZE + SIGNATURE_SIZE


def _fields_of(table: tuple[_Field, ...], obj: object, skip: frozenset[str]) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in table if f.name not in skip}


_NOTHING: Final[frozenset[str]] = frozenset()
_DERIVED_HEADER: Final = frozenset({"number_of_blocks", "measurement_record_length"})
_DERIVED_BLOCK: Final = frozenset({"measurement_size"})


@dataclass(frozen=True, slots=True, kw_only=True)
class SpdmMeasurementRequest:
    """The GET_MEASUREMENTS request the driver sent; `nonce` is the verifier's challenge."""

    spdm_version: int
    request_code: int
    param1: int
    param2: int
    nonce: bytes
    slot_id_param: int

    def __post_init__(self) -> None:
        _check_fields(REQUEST_FIELDS, self, _NOTHING)

    def to_bytes(self) -> bytes:
        return _encode(REQUEST_FIELDS, _fields_of(REQUEST_FIELDS, self, _NOTHING))

    @property
    def signature_requested(self) -> bool:
        """Param1 bit 0: without it the GPU sends no signature and proves nothing."""
        return bool(self.param1 & REQUEST_PARAM1_SIGNATURE_REQUESTED)

    @property
    def slot_id(self) -> int:
        """Certificate slot whose key signs the response (bits 3:0)."""
        return self.slot_id_param & 0x0F


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasurementBlock:
    """One measurement block with its DMTF measurement (the only format accepted)."""

    index: int
    value_type: int
    value: bytes
    measurement_specification: int = DMTF_MEASUREMENT_SPECIFICATION

    def __post_init__(self) -> None:
        # Index 0 and 0xFF are request operations (count / all), never a block's index.
        if isinstance(self.index, bool) or not isinstance(self.index, int):
            raise ValueError("index must be an integer")
        if not 1 <= self.index <= 0xFE:
            raise ValueError("index must be 1..254")
        if self.measurement_specification != DMTF_MEASUREMENT_SPECIFICATION:
            raise ValueError("only DMTF measurement blocks (specification 1) are supported")
        if isinstance(self.value_type, bool) or not 0 <= self.value_type <= 0xFF:
            raise ValueError("value_type must be a u8")
        if not isinstance(self.value, bytes) or len(self.value) > 0xFFFF - DMTF_HEADER_SIZE:
            raise ValueError("value must be bytes that fit a u16 measurement size")

    @property
    def is_digest(self) -> bool:
        """Bit 7 clear: the value is a hash of what was measured, not the raw bytes."""
        return not self.value_type & DMTF_VALUE_TYPE_RAW_BIT_STREAM

    @property
    def kind(self) -> int:
        """DMTF value type bits 6:0 (0 immutable ROM, 1 mutable firmware, 2 HW config, ...)."""
        return self.value_type & 0x7F

    def to_bytes(self) -> bytes:
        dmtf = _encode(
            DMTF_HEADER_FIELDS, {"value_type": self.value_type, "value_size": len(self.value)}
        )
        header = _encode(
            BLOCK_HEADER_FIELDS,
            {
                "index": self.index,
                "measurement_specification": self.measurement_specification,
                "measurement_size": DMTF_HEADER_SIZE + len(self.value),
            },
        )
        return header + dmtf + self.value


@dataclass(frozen=True, slots=True)
class OpaqueField:
    """One (type, value) entry of NVIDIA's opaque data, kept raw so bytes round-trip."""

    type: int
    value: bytes

    def __post_init__(self) -> None:
        if isinstance(self.type, bool) or not 0 <= self.type <= 0xFFFF:
            raise ValueError("opaque field type must be a u16")
        if not isinstance(self.value, bytes) or len(self.value) > 0xFFFF:
            raise ValueError("opaque field value must be at most 65535 bytes")

    @property
    def name(self) -> str:
        """NVIDIA's name for the type, or `unknown_<n>` (kept: it is signed data)."""
        return OPAQUE_FIELD_NAMES.get(self.type, f"unknown_{self.type}")

    def to_bytes(self) -> bytes:
        return _encode(OPAQUE_HEADER_FIELDS, {"type": self.type, "size": len(self.value)}) + (
            self.value
        )


_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]*")


def _text(value: bytes) -> str:
    """NUL-padded ASCII, as NVIDIA writes versions and SKUs; anything else is malformed."""
    stripped = value.rstrip(b"\x00")
    if not _PRINTABLE_ASCII.fullmatch(stripped):
        raise ValueError("text field is not NUL-padded printable ASCII")
    return stripped.decode("ascii")


def format_vbios_version(value: bytes) -> str:
    """NVIDIA's "96.00.9f.00.01" spelling of the 8-byte opaque VBIOS version.

    The bytes are (little-endian) u32 version then a u8 OEM revision: the first half is
    printed most significant byte first, then the byte that follows it, lower-case hex.
    """
    if len(value) != VBIOS_VERSION_SIZE:
        raise ValueError(f"VBIOS version is {len(value)} bytes, not {VBIOS_VERSION_SIZE}")
    half = len(value) // 2
    return ".".join(f"{b:02x}" for b in (*reversed(value[:half]), value[half]))


@dataclass(frozen=True, slots=True)
class OpaqueData:
    """NVIDIA's opaque data, in order; the known fields are decoded (and checked) eagerly."""

    fields: tuple[OpaqueField, ...] = ()

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for entry in self.fields:
            if not isinstance(entry, OpaqueField):
                raise ValueError("opaque data fields must be OpaqueField")
            if entry.type in seen:
                # Two values for one field: which one a reader picks would be arbitrary.
                raise ValueError(f"opaque field {entry.name} appears twice")
            seen.add(entry.type)
            if entry.type in _OPAQUE_TEXT_TYPES:
                _text(entry.value)
            elif entry.type == OPAQUE_VBIOS_VERSION:
                format_vbios_version(entry.value)
            elif entry.type == OPAQUE_MSRSCNT and len(entry.value) % MSRSCNT_ENTRY_SIZE:
                raise ValueError("msrscnt is not a whole number of u32 counters")
        if len(self.to_bytes()) > 0xFFFF:
            raise ValueError("opaque data exceeds its u16 length")

    def to_bytes(self) -> bytes:
        return b"".join(entry.to_bytes() for entry in self.fields)

    def get(self, field_type: int) -> bytes | None:
        """Raw value of a field, or None when the GPU did not send it."""
        for entry in self.fields:
            if entry.type == field_type:
                return entry.value
        return None

    def text(self, field_type: int) -> str | None:
        """A text field (NUL padding removed), or None when absent."""
        value = self.get(field_type)
        return None if value is None else _text(value)

    @property
    def driver_version(self) -> str | None:
        """GPU driver version, e.g. "550.90.07"."""
        return self.text(OPAQUE_DRIVER_VERSION)

    @property
    def vbios_version(self) -> str | None:
        """VBIOS version as NVIDIA prints it, e.g. "96.00.9f.00.01"."""
        value = self.get(OPAQUE_VBIOS_VERSION)
        return None if value is None else format_vbios_version(value)

    @property
    def project(self) -> str | None:
        return self.text(17)

    @property
    def project_sku(self) -> str | None:
        return self.text(18)

    @property
    def chip_sku(self) -> str | None:
        return self.text(15)

    @property
    def chip_sku_mod(self) -> str | None:
        return self.text(16)

    @property
    def fwid(self) -> bytes | None:
        """Firmware ID; the leaf certificate's TCG DICE extension must carry the same."""
        return self.get(OPAQUE_FWID)

    @property
    def measurement_counts(self) -> tuple[int, ...]:
        """How often each measurement index was extended (u32 each, index 1 first)."""
        value = self.get(OPAQUE_MSRSCNT) or b""
        return tuple(
            int.from_bytes(value[i : i + MSRSCNT_ENTRY_SIZE], "little")
            for i in range(0, len(value), MSRSCNT_ENTRY_SIZE)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SpdmMeasurementResponse:
    """The MEASUREMENTS response; `nonce` is the GPU's own (responder) nonce."""

    spdm_version: int
    response_code: int
    param1: int
    param2: int
    blocks: tuple[MeasurementBlock, ...]
    nonce: bytes
    opaque: OpaqueData
    signature: bytes
    trailing_padding: int = 0
    """Zero bytes the capture left after the signature (0 for NVIDIA's own samples)."""

    def __post_init__(self) -> None:
        _check_fields(RESPONSE_HEADER_FIELDS, self, _DERIVED_HEADER)
        if not 1 <= len(self.blocks) <= 0xFF:
            raise ValueError("a response carries 1..255 measurement blocks")
        indices = [block.index for block in self.blocks]
        if len(set(indices)) != len(indices):
            raise ValueError("two measurement blocks share an index")
        if len(self.record_bytes()) >= 1 << 24:
            raise ValueError("measurement record exceeds its u24 length")
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        if not isinstance(self.opaque, OpaqueData):
            raise ValueError("opaque must be OpaqueData")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_SIZE:
            raise ValueError(f"signature must be {SIGNATURE_SIZE} bytes")
        if not 0 <= self.trailing_padding <= MAX_TRAILING_PADDING:
            raise ValueError(f"trailing padding must be 0..{MAX_TRAILING_PADDING} bytes")

    def record_bytes(self) -> bytes:
        """The measurement record: every block, in order."""
        return b"".join(block.to_bytes() for block in self.blocks)

    def to_bytes(self) -> bytes:
        record = self.record_bytes()
        opaque = self.opaque.to_bytes()
        header = _fields_of(RESPONSE_HEADER_FIELDS, self, _DERIVED_HEADER)
        header["number_of_blocks"] = len(self.blocks)
        header["measurement_record_length"] = len(record)
        tail = _encode(RESPONSE_NONCE_FIELDS, {"nonce": self.nonce, "opaque_length": len(opaque)})
        return b"".join(
            (
                _encode(RESPONSE_HEADER_FIELDS, header),
                record,
                tail,
                opaque,
                self.signature,
                bytes(self.trailing_padding),
            )
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NvidiaGpuReport:
    """A parsed attestation report; `raw` is exactly the bytes it was parsed from."""

    request: SpdmMeasurementRequest
    response: SpdmMeasurementResponse
    raw: bytes = field(repr=False)

    @classmethod
    def assemble(
        cls, request: SpdmMeasurementRequest, response: SpdmMeasurementResponse
    ) -> NvidiaGpuReport:
        """A report from its parts (for tests and builders); `raw` is their serialisation."""
        return cls(request=request, response=response, raw=request.to_bytes() + response.to_bytes())

    def to_bytes(self) -> bytes:
        """Serialise from the fields (equals `raw` for parsed reports)."""
        return self.request.to_bytes() + self.response.to_bytes()

    @property
    def signed_bytes(self) -> bytes:
        """Request + response without the signature: what the GPU signed (with SHA-384)."""
        return self.raw[: len(self.raw) - SIGNATURE_SIZE - self.response.trailing_padding]

    @property
    def signature(self) -> bytes:
        return self.response.signature

    @property
    def requester_nonce(self) -> bytes:
        """The verifier's challenge, echoed inside the signed request."""
        return self.request.nonce

    @property
    def measurements(self) -> dict[int, bytes]:
        """Measurement index -> DMTF value (a fresh dict: the report stays immutable)."""
        return {block.index: block.value for block in self.response.blocks}


_HEX_TEXT = re.compile(r"\s*((?:[0-9a-fA-F]{2})*)\s*")


def decode_report_hex(text: str | bytes) -> bytes:
    """The report bytes from the hex text NVIDIA's tools write (surrounding space allowed)."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise QuoteParseError("the hex report is not ASCII text") from None
    if not isinstance(text, str):
        raise QuoteParseError(f"the hex report must be text, not {type(text).__name__}")
    if len(text) > 2 * MAX_REPORT_SIZE + 1024:
        raise QuoteParseError(f"the hex report exceeds {MAX_REPORT_SIZE} bytes")
    match = _HEX_TEXT.fullmatch(text)
    if match is None:
        raise QuoteParseError("the report is not an even number of hex digits")
    return bytes.fromhex(match.group(1))


class _Reader:
    """Bounds-checked cursor: every read names what ran out, so errors say where."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def table(self, table: tuple[_Field, ...], size: int, what: str) -> dict[str, Any]:
        if self.left < size:
            raise QuoteParseError(f"report ends inside the {what} ({self.left} of {size} bytes)")
        values = _decode(table, self.data, self.pos)
        self.pos += size
        return values

    def take(self, size: int, what: str) -> bytes:
        if size > self.left:
            raise QuoteParseError(f"{what} of {size} bytes exceeds the {self.left} bytes left")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk


def _parse_request(reader: _Reader) -> SpdmMeasurementRequest:
    values = reader.table(REQUEST_FIELDS, REQUEST_SIZE, "GET_MEASUREMENTS request")
    request = SpdmMeasurementRequest(**values)
    if request.spdm_version not in SUPPORTED_SPDM_VERSIONS:
        raise QuoteParseError(f"request SPDM version {request.spdm_version:#04x} is not 0x11")
    if request.request_code != SPDM_GET_MEASUREMENTS:
        raise QuoteParseError(
            f"request code {request.request_code:#04x} is not GET_MEASUREMENTS (0xe0)"
        )
    if not request.signature_requested:
        raise QuoteParseError("the request did not ask for a signed response (param1 bit 0)")
    return request


def _parse_blocks(record: bytes, count: int) -> tuple[MeasurementBlock, ...]:
    reader = _Reader(record)
    blocks: list[MeasurementBlock] = []
    for n in range(count):
        head = reader.table(BLOCK_HEADER_FIELDS, BLOCK_HEADER_SIZE, f"block {n} header")
        if head["measurement_specification"] != DMTF_MEASUREMENT_SPECIFICATION:
            raise QuoteParseError(
                f"measurement block {head['index']} uses specification "
                f"{head['measurement_specification']:#04x}, not DMTF (0x01)"
            )
        body = _Reader(reader.take(head["measurement_size"], f"block {head['index']}"))
        dmtf = body.table(DMTF_HEADER_FIELDS, DMTF_HEADER_SIZE, f"block {head['index']} DMTF")
        value = body.take(dmtf["value_size"], f"block {head['index']} value")
        if body.left:
            raise QuoteParseError(
                f"measurement block {head['index']} has {body.left} bytes after its value"
            )
        blocks.append(
            MeasurementBlock(
                index=head["index"],
                measurement_specification=head["measurement_specification"],
                value_type=dmtf["value_type"],
                value=value,
            )
        )
    if reader.left:
        raise QuoteParseError(f"{reader.left} bytes after the {count} measurement blocks")
    return tuple(blocks)


def _parse_opaque(data: bytes) -> OpaqueData:
    reader = _Reader(data)
    entries: list[OpaqueField] = []
    while reader.left:
        head = reader.table(OPAQUE_HEADER_FIELDS, OPAQUE_HEADER_SIZE, "opaque field header")
        name = OPAQUE_FIELD_NAMES.get(head["type"], f"unknown_{head['type']}")
        entries.append(OpaqueField(head["type"], reader.take(head["size"], f"opaque {name}")))
    return OpaqueData(tuple(entries))


def _parse_response(reader: _Reader, request: SpdmMeasurementRequest) -> SpdmMeasurementResponse:
    head = reader.table(RESPONSE_HEADER_FIELDS, RESPONSE_HEADER_SIZE, "MEASUREMENTS header")
    if head["spdm_version"] != request.spdm_version:
        raise QuoteParseError(
            f"response SPDM version {head['spdm_version']:#04x} differs from the request's"
        )
    if head["response_code"] != SPDM_MEASUREMENTS:
        raise QuoteParseError(
            f"response code {head['response_code']:#04x} is not MEASUREMENTS (0x60)"
        )
    if head["number_of_blocks"] == 0:
        raise QuoteParseError("the response carries no measurement blocks")
    record = reader.take(head["measurement_record_length"], "measurement record")
    blocks = _parse_blocks(record, head["number_of_blocks"])
    tail = reader.table(RESPONSE_NONCE_FIELDS, RESPONSE_NONCE_SIZE, "responder nonce")
    opaque = _parse_opaque(reader.take(tail["opaque_length"], "opaque data"))
    left = reader.left
    if left < SIGNATURE_SIZE:
        raise QuoteParseError(
            f"{left} bytes follow the opaque data; the signature is {SIGNATURE_SIZE}"
        )
    signature = reader.take(SIGNATURE_SIZE, "signature")
    padding = reader.take(reader.left, "padding")
    if len(padding) > MAX_TRAILING_PADDING or padding.count(0) != len(padding):
        raise QuoteParseError(
            f"{left} bytes follow the opaque data: the signature is {SIGNATURE_SIZE}, and "
            f"after it only up to {MAX_TRAILING_PADDING} zero bytes of padding are allowed"
        )
    return SpdmMeasurementResponse(
        spdm_version=head["spdm_version"],
        response_code=head["response_code"],
        param1=head["param1"],
        param2=head["param2"],
        blocks=blocks,
        nonce=tail["nonce"],
        opaque=opaque,
        signature=signature,
        trailing_padding=len(padding),
    )


def parse_nvidia_report(data: bytes) -> NvidiaGpuReport:
    """Parse request + response bytes; raise `QuoteParseError` on anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise QuoteParseError(f"report must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_REPORT_SIZE:
        raise QuoteParseError(f"report of {len(raw)} bytes exceeds {MAX_REPORT_SIZE} bytes")
    if len(raw) < MIN_REPORT_SIZE:
        raise QuoteParseError(f"report is {len(raw)} bytes, shorter than {MIN_REPORT_SIZE}")
    reader = _Reader(raw)
    try:
        request = _parse_request(reader)
        response = _parse_response(reader, request)
    except ValueError as exc:  # a constructor's own check (bad text, duplicate field, ...)
        raise QuoteParseError(f"malformed NVIDIA report: {exc}") from None
    return NvidiaGpuReport(request=request, response=response, raw=raw)
