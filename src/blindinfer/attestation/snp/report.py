"""Parse (and re-serialise) AMD SEV-SNP ATTESTATION_REPORTs from untrusted bytes.

Client side: this module imports nothing from the server or the TEE providers. The
1184-byte report (AMD SEV-SNP ABI specification, table "ATTESTATION_REPORT Structure") is
described ONCE by the declarative `REPORT_FIELDS` table, which drives both parsing and
`SnpReport.to_bytes`, so the two cannot disagree; the tests check byte-exact round trips on
real reports.

Report versions 2 to 5 exist: version 3 added the CPUID family/model/stepping bytes at
0x188, version 5 the launch/current mitigation vectors at 0x1F8 (version 4 has the
version-3 layout, as virtee/sev also reads it). Bytes that the specification declares
reserved (MBZ) for the report's version must be zero; a report that sets them was not made
by firmware we understand, so it is refused rather than half-read.

Parsing does not make a report trustworthy (that is `attestation.snp`'s job) and carries no
policy: it gives the verifier and `SnpPolicy` typed fields. Any malformed input raises
`QuoteParseError` and nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final, Literal

from blindinfer.errors import QuoteParseError

REPORT_SIZE: Final = 0x4A0
"""An ATTESTATION_REPORT is always 1184 bytes, whatever its version."""

SIGNED_SIZE: Final = 0x2A0
"""The PSP signs bytes [0x000, 0x2A0): everything before the signature."""

MIN_REPORT_VERSION: Final = 2
MAX_REPORT_VERSION: Final = 5

SIG_ALGO_ECDSA_P384_SHA384: Final = 1
"""The only SIGNATURE_ALGO the specification defines."""

SIGNATURE_COMPONENT_SIZE: Final = 72
"""R and S are little-endian and zero-extended from 48 to 72 bytes each."""

SIGNING_KEY_VCEK: Final = 0
SIGNING_KEY_VLEK: Final = 1
SIGNING_KEY_NONE: Final = 7

TcbLayout = Literal["milan-genoa", "turin"]
"""Milan and Genoa share one TCB_VERSION byte layout; Turin (Zen 5) moved it to add FMC."""

PRODUCT_MILAN: Final = "Milan"
PRODUCT_GENOA: Final = "Genoa"
PRODUCT_TURIN: Final = "Turin"


def tcb_layout_for(product: str) -> TcbLayout:
    """The TCB_VERSION layout a product's firmware writes (only Turin differs)."""
    return "turin" if product == PRODUCT_TURIN else "milan-genoa"


def product_from_cpuid(family: int, model: int) -> str | None:
    """The SEV-SNP product from CPUID family/model (as virtee/sev maps them), or None.

    Why: a version-3+ report states which processor made it, which decides how its TCB
    fields read; version-2 reports leave it to the chip certificate.
    """
    if family == 0x19:
        if model <= 0x0F:
            return PRODUCT_MILAN
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return PRODUCT_GENOA
    if family == 0x1A and model <= 0x11:
        return PRODUCT_TURIN
    return None


# --- guest policy ------------------------------------------------------------------------

_POLICY_SMT = 16
_POLICY_RESERVED_ONE = 17
_POLICY_MIGRATE_MA = 18
_POLICY_DEBUG = 19
_POLICY_SINGLE_SOCKET = 20
_POLICY_DEFINED_BITS = 26
"""Bits 63:26 of the guest policy are reserved, MBZ (bit 25 is PAGE_SWAP_DISABLE)."""


class GuestPolicy(int):
    """The u64 guest POLICY, an int with named views of the bits a verifier cares about.

    An int subclass so the value compares and serialises like the plain number the
    specification defines, while `report.policy.debug_allowed` reads naturally.
    """

    __slots__ = ()

    def _bit(self, bit: int) -> bool:
        return bool(int(self) >> bit & 1)

    @property
    def abi_minor(self) -> int:
        """Minimum firmware ABI minor version the guest accepts (bits 7:0)."""
        return int(self) & 0xFF

    @property
    def abi_major(self) -> int:
        """Minimum firmware ABI major version the guest accepts (bits 15:8)."""
        return int(self) >> 8 & 0xFF

    @property
    def smt_allowed(self) -> bool:
        """Bit 16: the guest may run with simultaneous multithreading (SMT) enabled."""
        return self._bit(_POLICY_SMT)

    @property
    def migrate_ma(self) -> bool:
        """Bit 18: a migration agent may be associated with the guest (it can export it)."""
        return self._bit(_POLICY_MIGRATE_MA)

    @property
    def debug_allowed(self) -> bool:
        """Bit 19: the host may debug the guest, i.e. read and write its memory."""
        return self._bit(_POLICY_DEBUG)

    @property
    def single_socket(self) -> bool:
        """Bit 20: the guest may only be activated on one socket."""
        return self._bit(_POLICY_SINGLE_SOCKET)


# --- TCB_VERSION -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcbVersion:
    """A TCB_VERSION (u64): the security patch levels of the firmware components.

    Milan/Genoa: byte 0 BOOT_LOADER, 1 TEE, 2-5 reserved, 6 SNP, 7 MICROCODE.
    Turin:       byte 0 FMC, 1 BOOT_LOADER, 2 TEE, 3 SNP, 4-6 reserved, 7 MICROCODE.
    `raw` is authoritative; `layout` only says how to read it, and can be corrected with
    `as_layout` once the product is known from the chip certificate.
    """

    raw: int
    layout: TcbLayout = "milan-genoa"

    def __post_init__(self) -> None:
        if not isinstance(self.raw, int) or not 0 <= self.raw < 1 << 64:
            raise ValueError("a TCB_VERSION is an unsigned 64-bit integer")
        if self.layout not in ("milan-genoa", "turin"):
            raise ValueError(f"unknown TCB layout {self.layout!r}")

    def _byte(self, index: int) -> int:
        return self.raw >> (8 * index) & 0xFF

    @property
    def bootloader(self) -> int:
        """BOOT_LOADER security version."""
        return self._byte(1 if self.layout == "turin" else 0)

    @property
    def tee(self) -> int:
        """TEE (PSP OS) security version."""
        return self._byte(2 if self.layout == "turin" else 1)

    @property
    def snp(self) -> int:
        """SNP firmware security version."""
        return self._byte(3 if self.layout == "turin" else 6)

    @property
    def microcode(self) -> int:
        """CPU microcode security version."""
        return self._byte(7)

    @property
    def fmc(self) -> int | None:
        """FMC (Turin's first mutable code) security version; None on Milan/Genoa."""
        return self._byte(0) if self.layout == "turin" else None

    def as_layout(self, layout: TcbLayout) -> TcbVersion:
        """The same raw value read with another layout."""
        return TcbVersion(self.raw, layout)

    @classmethod
    def from_parts(
        cls,
        *,
        bootloader: int,
        tee: int,
        snp: int,
        microcode: int,
        fmc: int | None = None,
        layout: TcbLayout = "milan-genoa",
    ) -> TcbVersion:
        """Compose a TCB_VERSION from its components (e.g. from a VCEK's extensions)."""
        parts = (bootloader, tee, snp, microcode, fmc or 0)
        if any(not 0 <= p <= 0xFF for p in parts):
            raise ValueError("TCB components are bytes (0..255)")
        if layout == "turin":
            placed = {0: fmc or 0, 1: bootloader, 2: tee, 3: snp, 7: microcode}
        else:
            if fmc is not None:
                raise ValueError("only the Turin TCB layout has an FMC component")
            placed = {0: bootloader, 1: tee, 6: snp, 7: microcode}
        return cls(sum(v << (8 * i) for i, v in placed.items()), layout)

    def describe(self) -> str:
        """Components by name, for error messages and policy mismatches."""
        fmc = f"fmc={self.fmc} " if self.fmc is not None else ""
        return (
            f"{fmc}bootloader={self.bootloader} tee={self.tee} snp={self.snp} "
            f"microcode={self.microcode} (0x{self.raw:016x})"
        )


# --- the field table ---------------------------------------------------------------------

_Kind = Literal["int", "bytes", "tcb", "policy"]


@dataclass(frozen=True, slots=True)
class _Field:
    """One fixed-size field: little-endian unsigned integer (int/tcb/policy) or raw bytes."""

    name: str
    offset: int
    size: int
    kind: _Kind = "bytes"


def _u(name: str, offset: int, size: int) -> _Field:
    return _Field(name, offset, size, "int")


def _b(name: str, offset: int, size: int) -> _Field:
    return _Field(name, offset, size, "bytes")


def _t(name: str, offset: int) -> _Field:
    return _Field(name, offset, 8, "tcb")


def _check_table(table: tuple[_Field, ...], total: int) -> int:
    """Fail at import if the table has gaps or overlaps: the layout must be contiguous."""
    pos = 0
    for f in table:
        if f.offset != pos or f.size <= 0 or (f.kind != "bytes" and f.size not in (1, 4, 8)):
            raise RuntimeError(f"layout table broken at field {f.name!r}")
        pos += f.size
    if pos != total:
        raise RuntimeError(f"layout table covers {pos} bytes, expected {total}")
    return total


# AMD SEV-SNP ABI specification, "ATTESTATION_REPORT Structure". Reserved regions are kept
# as fields so that bytes round-trip; the parser checks them against `_MBZ`.
REPORT_FIELDS: Final = (
    _u("version", 0x000, 4),
    _u("guest_svn", 0x004, 4),
    _Field("policy", 0x008, 8, "policy"),
    _b("family_id", 0x010, 16),
    _b("image_id", 0x020, 16),
    _u("vmpl", 0x030, 4),
    _u("signature_algo", 0x034, 4),
    _t("current_tcb", 0x038),
    _u("platform_info", 0x040, 8),
    _u("signer_info", 0x048, 4),  # AUTHOR_KEY_EN, MASK_CHIP_KEY, SIGNING_KEY
    _b("reserved_04c", 0x04C, 4),
    _b("report_data", 0x050, 64),
    _b("measurement", 0x090, 48),
    _b("host_data", 0x0C0, 32),
    _b("id_key_digest", 0x0E0, 48),
    _b("author_key_digest", 0x110, 48),
    _b("report_id", 0x140, 32),
    _b("report_id_ma", 0x160, 32),
    _t("reported_tcb", 0x180),
    _u("cpuid_fam_id", 0x188, 1),  # version 3+
    _u("cpuid_mod_id", 0x189, 1),  # version 3+
    _u("cpuid_step", 0x18A, 1),  # version 3+
    _b("reserved_18b", 0x18B, 0x1A0 - 0x18B),
    _b("chip_id", 0x1A0, 64),
    _t("committed_tcb", 0x1E0),
    _u("current_build", 0x1E8, 1),
    _u("current_minor", 0x1E9, 1),
    _u("current_major", 0x1EA, 1),
    _b("reserved_1eb", 0x1EB, 1),
    _u("committed_build", 0x1EC, 1),
    _u("committed_minor", 0x1ED, 1),
    _u("committed_major", 0x1EE, 1),
    _b("reserved_1ef", 0x1EF, 1),
    _t("launch_tcb", 0x1F0),
    _u("launch_mit_vector", 0x1F8, 8),  # version 5+
    _u("current_mit_vector", 0x200, 8),  # version 5+
    _b("reserved_208", 0x208, SIGNED_SIZE - 0x208),
    _b("signature_r", 0x2A0, SIGNATURE_COMPONENT_SIZE),
    _b("signature_s", 0x2E8, SIGNATURE_COMPONENT_SIZE),
    _b("reserved_330", 0x330, REPORT_SIZE - 0x330),
)
_check_table(REPORT_FIELDS, REPORT_SIZE)

_FIELDS_BY_NAME: Final = {f.name: f for f in REPORT_FIELDS}

# Fields that are reserved (MBZ) always, and those only reserved before a version.
_MBZ_ALWAYS: Final = ("reserved_04c", "reserved_18b", "reserved_1eb", "reserved_1ef")
_MBZ_BEFORE_VERSION: Final = (
    (3, ("cpuid_fam_id", "cpuid_mod_id", "cpuid_step")),
    (5, ("launch_mit_vector", "current_mit_vector")),
)
_SIGNER_INFO_DEFINED_BITS: Final = 5
_SIGNATURE_VALUE_SIZE: Final = 48
"""P-384 scalars are 48 bytes; bytes 48..71 of R and S are the zero extension."""


def _decode(data: bytes) -> dict[str, Any]:
    """Read every field of `REPORT_FIELDS` (the caller checked the length)."""
    out: dict[str, Any] = {}
    for f in REPORT_FIELDS:
        chunk = data[f.offset : f.offset + f.size]
        if f.kind == "bytes":
            out[f.name] = chunk
            continue
        number = int.from_bytes(chunk, "little")
        if f.kind == "tcb":
            out[f.name] = TcbVersion(number)
        elif f.kind == "policy":
            out[f.name] = GuestPolicy(number)
        else:
            out[f.name] = number
    return out


def _check_value(f: _Field, value: object) -> None:
    """Reject wrongly typed or sized values at construction, so `to_bytes` cannot lie."""
    if f.kind == "bytes":
        if not isinstance(value, bytes) or len(value) != f.size:
            raise ValueError(f"{f.name} must be {f.size} bytes")
        return
    if f.kind == "tcb":
        if not isinstance(value, TcbVersion):
            raise ValueError(f"{f.name} must be a TcbVersion")
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{f.name} must be an integer")
    if not 0 <= value < 1 << (8 * f.size):
        raise ValueError(f"{f.name} must be an unsigned {8 * f.size}-bit integer")


_Z = bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpReport:
    """A parsed ATTESTATION_REPORT; `to_bytes()` gives back exactly the parsed bytes."""

    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    chip_id: bytes
    committed_tcb: TcbVersion
    launch_tcb: TcbVersion
    signature_r: bytes
    signature_s: bytes
    cpuid_fam_id: int = 0
    cpuid_mod_id: int = 0
    cpuid_step: int = 0
    current_build: int = 0
    current_minor: int = 0
    current_major: int = 0
    committed_build: int = 0
    committed_minor: int = 0
    committed_major: int = 0
    launch_mit_vector: int = 0
    current_mit_vector: int = 0
    reserved_04c: bytes = _Z(4)
    reserved_18b: bytes = _Z(0x1A0 - 0x18B)
    reserved_1eb: bytes = _Z(1)
    reserved_1ef: bytes = _Z(1)
    reserved_208: bytes = _Z(SIGNED_SIZE - 0x208)
    reserved_330: bytes = _Z(REPORT_SIZE - 0x330)

    def __post_init__(self) -> None:
        if not isinstance(self.policy, GuestPolicy):
            if isinstance(self.policy, bool) or not isinstance(self.policy, int):
                raise ValueError("policy must be an integer")
            object.__setattr__(self, "policy", GuestPolicy(self.policy))
        for f in REPORT_FIELDS:
            _check_value(f, getattr(self, f.name))

    def to_bytes(self) -> bytes:
        """Serialise from the fields (equals the parsed bytes for parsed reports)."""
        parts: list[bytes] = []
        for f in REPORT_FIELDS:
            value = getattr(self, f.name)
            if f.kind == "bytes":
                parts.append(value)
            else:
                number = value.raw if f.kind == "tcb" else int(value)
                parts.append(number.to_bytes(f.size, "little"))
        return b"".join(parts)

    @property
    def signed_bytes(self) -> bytes:
        """Bytes 0x000..0x29F: what the VCEK/VLEK signed."""
        return self.to_bytes()[:SIGNED_SIZE]

    @property
    def author_key_en(self) -> bool:
        """AUTHOR_KEY_EN: the report carries an author key digest."""
        return bool(self.signer_info & 1)

    @property
    def mask_chip_key(self) -> bool:
        """MASK_CHIP_KEY: the host zeroed CHIP_ID (only VLEK-style attestation then names it)."""
        return bool(self.signer_info >> 1 & 1)

    @property
    def signing_key(self) -> int:
        """SIGNING_KEY: 0 VCEK, 1 VLEK, 7 none (an unsigned report)."""
        return self.signer_info >> 2 & 0b111

    @property
    def cpuid_product(self) -> str | None:
        """The product that the report's CPUID bytes name (version 3+), or None."""
        if self.version < 3:
            return None
        return product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    def for_product(self, product: str) -> SnpReport:
        """This report with its TCB fields read in `product`'s layout (raw bytes unchanged).

        Why: a version-2 report does not say which processor made it; the verifier knows
        the product from the certificate chain and re-reads the TCBs accordingly.
        """
        layout = tcb_layout_for(product)
        return dataclasses.replace(
            self,
            current_tcb=self.current_tcb.as_layout(layout),
            reported_tcb=self.reported_tcb.as_layout(layout),
            committed_tcb=self.committed_tcb.as_layout(layout),
            launch_tcb=self.launch_tcb.as_layout(layout),
        )


def _check_reserved(values: dict[str, Any]) -> None:
    """Every byte the specification reserves (MBZ) for this version must be zero."""
    version = values["version"]
    for name in _MBZ_ALWAYS:
        if any(values[name]):
            f = _FIELDS_BY_NAME[name]
            raise QuoteParseError(f"reserved bytes at 0x{f.offset:03x} are not zero")
    for since, names in _MBZ_BEFORE_VERSION:
        for name in names:
            if version < since and values[name]:
                raise QuoteParseError(
                    f"{name} (0x{_FIELDS_BY_NAME[name].offset:03x}) must be zero in a "
                    f"version {version} report: the field only exists from version {since}"
                )
    if any(values["reserved_208"]):
        raise QuoteParseError("reserved bytes 0x208..0x29f are not zero")
    policy: int = values["policy"]
    if not policy >> _POLICY_RESERVED_ONE & 1:
        raise QuoteParseError("guest policy bit 17 is reserved and must be one")
    if policy >> _POLICY_DEFINED_BITS:
        raise QuoteParseError(f"guest policy 0x{policy:x} sets reserved bits 63:26")
    signer_info: int = values["signer_info"]
    if signer_info >> _SIGNER_INFO_DEFINED_BITS:
        raise QuoteParseError(f"signer info 0x{signer_info:x} sets reserved bits 31:5")
    signing_key = signer_info >> 2 & 0b111
    if signing_key not in (SIGNING_KEY_VCEK, SIGNING_KEY_VLEK, SIGNING_KEY_NONE):
        raise QuoteParseError(f"SIGNING_KEY {signing_key} is reserved (0 VCEK, 1 VLEK, 7 none)")
    if values["signature_algo"] == SIG_ALGO_ECDSA_P384_SHA384:
        for name in ("signature_r", "signature_s"):
            if any(values[name][_SIGNATURE_VALUE_SIZE:]):
                raise QuoteParseError(f"{name} is not a zero-extended 48-byte P-384 value")
        if any(values["reserved_330"]):
            raise QuoteParseError("reserved bytes after the ECDSA signature are not zero")


def parse_snp_report(data: bytes, *, offset: int = 0) -> SnpReport:
    """Parse the report that starts at `offset` in `data` and runs to its end.

    Raises `QuoteParseError` on anything malformed: wrong size, unsupported version,
    reserved bits or bytes set.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise QuoteParseError(f"report must be bytes, not {type(data).__name__}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise QuoteParseError("report offset must be a non-negative integer")
    raw = bytes(data)[offset:]
    if len(raw) != REPORT_SIZE:
        raise QuoteParseError(
            f"an SEV-SNP attestation report is {REPORT_SIZE} bytes, got {len(raw)} "
            f"(from offset {offset})"
        )
    values = _decode(raw)
    version = values["version"]
    if not MIN_REPORT_VERSION <= version <= MAX_REPORT_VERSION:
        raise QuoteParseError(
            f"report version {version} is not supported "
            f"({MIN_REPORT_VERSION}..{MAX_REPORT_VERSION})"
        )
    _check_reserved(values)
    product = (
        product_from_cpuid(values["cpuid_fam_id"], values["cpuid_mod_id"]) if version >= 3 else None
    )
    if product is not None:
        layout = tcb_layout_for(product)
        for f in REPORT_FIELDS:
            if f.kind == "tcb":
                values[f.name] = values[f.name].as_layout(layout)
    try:
        return SnpReport(**values)
    except ValueError as exc:  # unreachable for decoded values; keeps the contract total
        raise QuoteParseError(str(exc)) from None
