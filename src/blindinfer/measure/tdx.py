"""Intel TDX launch measurements (MRTD, RTMR0-2) of a QEMU direct-boot VM, from its files.

The VM boots OVMF/TDVF (`-bios FW`) which loads the kernel, initrd and command line that
QEMU hands it over fw_cfg (`-kernel K -initrd I -append CMDLINE`). A TDX quote of that VM
reports:

* MRTD: what the VMM added to the TD before it ran: every page of every section the TDVF
  metadata lists (TDH.MEM.PAGE.ADD), and the content of the sections with the MR.EXTEND
  attribute (TDH.MR.EXTEND, 256 bytes at a time). QEMU (target/i386/kvm/tdx.c) adds the
  sections in metadata order, one KVM_TDX_INIT_MEM_REGION per section.
* RTMR1: OVMF's measurements of the boot path (OvmfPkg/Tcg/TdTcg2Dxe): the Authenticode
  SHA-384 of the kernel PE image as LoadImage sees it, "Calling EFI Application from Boot
  Option", the RTMR1 separator, and the two ExitBootServices actions.
* RTMR2: the Linux EFI stub's tagged events: the LoadOptions OVMF built (the command line,
  " initrd=initrd" appended when there is an initrd, UTF-16LE with its terminator), then
  the initrd bytes.
* RTMR0: the TD HOB, the CFV, the Secure Boot variables, and the ACPI tables QEMU
  generates. Those tables depend on the QEMU version, machine type and device set, not on
  the boot files, so RTMR0 is not computed here (`rtmr0` is None, `rtmr0_reason` says why).

Two facts depend on the VMM rather than on the files, and are explicit parameters:

* `kernel_load`: QEMU before 10.2 patches the bzImage setup header (loader type, heap,
  command line and initrd addresses) for confidential guests too, and OVMF before
  edk2-stable202502 (or QEMU before 10.0, which lacks the fw_cfg file etc/boot/kernel)
  measures that patched image. QEMU >= 10.2, or QEMU >= 10.0 with OVMF >= 202502, hand
  OVMF the kernel file as given.
* `page_order`: upstream KVM (Linux 6.16+) measures each page right after adding it; some
  pre-upstream TDX stacks added all pages of a section first, then measured them.

Every parser here reads untrusted bytes: the firmware's OVMF table and TDVF metadata, the
kernel's PE/COFF and setup headers. Each is parsed once into a frozen object, with every
offset bounded before use, and a malformed input raises `TdxInputError` with one line that
says what is wrong and what to give instead.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from blindinfer.errors import UsageError

__all__ = [
    "LAUNCH_TD_ATTRIBUTES",
    "XFAM_NOTE",
    "KernelLoad",
    "PageOrder",
    "PeImage",
    "TdvfMetadata",
    "TdvfSection",
    "TdvfSectionType",
    "TdxInputError",
    "TdxMeasurement",
    "authenticode_digest",
    "compute_mrtd",
    "extend_chain",
    "load_options",
    "measure_tdx",
    "parse_pe",
    "parse_tdvf",
    "qemu_patch_kernel",
]


class TdxInputError(UsageError):
    """A boot file that cannot be measured: not a TDVF, not a PE kernel, out-of-bounds
    metadata. A UsageError because the fix is to give another file; the message says which."""


MIB = 1 << 20
PAGE_SIZE = 0x1000
MR_EXTEND_CHUNK = 0x100
SHA384_SIZE = 48

# --- the firmware: OVMF GUIDed table and TDVF metadata ------------------------------------

# QEMU (hw/i386/pc_sysfw_ovmf.c) looks for the table footer GUID this many bytes before the
# end of the image, reads the table length just before it, and walks entries backwards.
OVMF_TABLE_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
OVMF_BYTES_AFTER_FOOTER = 32
TDX_METADATA_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")
# edk2 puts this GUID just before the descriptor; QEMU does not check it, nor do we.
TDX_METADATA_GUID = uuid.UUID("e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae")

_TABLE_ENTRY_TAIL = struct.Struct("<H16s")  # entry length, then GUID, at the end of an entry
_METADATA_OFFSET = struct.Struct("<I")  # data of the TDX_METADATA_OFFSET entry
_DESCRIPTOR = struct.Struct("<4sIII")  # Signature, Length, Version, NumberOfSectionEntries
_SECTION = struct.Struct("<IIQQII")  # DataOffset, RawDataSize, MemoryAddress,
#                                      MemoryDataSize, Type, Attributes
TDVF_SIGNATURE = b"TDVF"
TDVF_VERSION = 1
ATTRIBUTE_MR_EXTEND = 0x1

# QEMU refuses images that are not a non-zero multiple of 64 KiB (x86_bios_rom_init); the
# upper bound keeps the work bounded and is far above any TDVF (4 MiB today).
FIRMWARE_ALIGN = 0x10000
FIRMWARE_MAX = 64 * MIB
# Bounds on the metadata: the page count bounds the MRTD work; GPAs are at most 52 bits.
MAX_SECTIONS = 64
MAX_TOTAL_PAGES = 1 << 20
MAX_GPA = 1 << 52


class TdvfSectionType(enum.IntEnum):
    """The section types QEMU accepts (hw/i386/tdvf.c); it refuses any other."""

    BFV = 0
    CFV = 1
    TD_HOB = 2
    TEMP_MEM = 3


# Sections QEMU copies from the image (RawDataSize must be non-zero), and the others (zero).
_FROM_IMAGE = frozenset({TdvfSectionType.BFV, TdvfSectionType.CFV})


@dataclass(frozen=True, slots=True)
class TdvfSection:
    """One TDVF metadata section entry, checked as QEMU checks it."""

    data_offset: int
    raw_data_size: int
    memory_address: int
    memory_data_size: int
    type: TdvfSectionType
    attributes: int

    @property
    def mr_extend(self) -> bool:
        """Whether the VMM extends MRTD with this section's content."""
        return bool(self.attributes & ATTRIBUTE_MR_EXTEND)

    @property
    def pages(self) -> int:
        return self.memory_data_size // PAGE_SIZE


@dataclass(frozen=True, slots=True)
class TdvfMetadata:
    """The TDVF metadata of a firmware image: where it lies and its sections, in order."""

    offset: int
    sections: tuple[TdvfSection, ...]


def _fail(message: str) -> TdxInputError:
    return TdxInputError(message)


_GIVE_TDVF = "give an OVMF image built with TDX support (edk2 OvmfPkg/IntelTdx/IntelTdxX64.dsc)"


def _ovmf_table_entry(fw: bytes, guid: uuid.UUID) -> bytes | None:
    """The data of the OVMF GUIDed table entry `guid`, or None where the table lacks it.

    Mirrors QEMU's pc_system_parse_ovmf_flash / pc_system_ovmf_table_find."""
    footer_end = len(fw) - OVMF_BYTES_AFTER_FOOTER
    footer = footer_end - _TABLE_ENTRY_TAIL.size
    if footer < 0:
        raise _fail(f"firmware is too short ({len(fw)} bytes) to hold an OVMF table; {_GIVE_TDVF}")
    table_len, footer_guid = _TABLE_ENTRY_TAIL.unpack_from(fw, footer)
    if footer_guid != OVMF_TABLE_FOOTER_GUID.bytes_le:
        raise _fail(
            f"firmware has no OVMF table footer (GUID {OVMF_TABLE_FOOTER_GUID}) "
            f"{len(fw) - footer - 2} bytes before its end: not OVMF/TDVF; {_GIVE_TDVF}"
        )
    entries_len = table_len - _TABLE_ENTRY_TAIL.size
    if entries_len < 0 or entries_len > footer:
        raise _fail(f"OVMF table length {table_len} is out of bounds of the firmware")
    start = footer - entries_len
    end = footer  # one past the last byte of the entry being looked at
    while end - start >= _TABLE_ENTRY_TAIL.size:
        entry_len, entry_guid = _TABLE_ENTRY_TAIL.unpack_from(fw, end - _TABLE_ENTRY_TAIL.size)
        if entry_len < _TABLE_ENTRY_TAIL.size or entry_len > end - start:
            raise _fail(
                f"OVMF table entry ending at 0x{end:x} has length {entry_len}, out of bounds"
            )
        if entry_guid == guid.bytes_le:
            return fw[end - entry_len : end - _TABLE_ENTRY_TAIL.size]
        end -= entry_len
    return None


def _parse_section(fw_len: int, index: int, raw: tuple[int, ...]) -> TdvfSection:
    data_offset, raw_size, address, size, type_value, attributes = raw
    where = f"TDVF section {index}"
    try:
        kind = TdvfSectionType(type_value)
    except ValueError:
        raise _fail(f"{where} has type {type_value}, which QEMU does not support") from None
    where = f"TDVF section {index} ({kind.name})"
    if size < raw_size:
        raise _fail(f"{where}: MemoryDataSize 0x{size:x} < RawDataSize 0x{raw_size:x}")
    if address % PAGE_SIZE or size % PAGE_SIZE:
        raise _fail(f"{where}: address 0x{address:x} or size 0x{size:x} is not page-aligned")
    if size == 0 or address + size > MAX_GPA:
        raise _fail(f"{where}: memory range 0x{address:x}+0x{size:x} is empty or beyond 2^52")
    if attributes & ~ATTRIBUTE_MR_EXTEND:
        raise _fail(f"{where}: attributes 0x{attributes:x} other than MR.EXTEND are not supported")
    if kind in _FROM_IMAGE:
        if raw_size == 0:
            raise _fail(f"{where}: RawDataSize is 0 but QEMU copies this section from the image")
        # QEMU copies MemoryDataSize bytes from the image at DataOffset (tdx.c), and the TD
        # module measures them: all of them must lie inside the firmware.
        if data_offset + size > fw_len:
            raise _fail(
                f"{where}: data 0x{data_offset:x}+0x{size:x} lies outside the "
                f"0x{fw_len:x}-byte firmware"
            )
    else:
        if raw_size != 0:
            raise _fail(f"{where}: RawDataSize 0x{raw_size:x} must be 0 for this type")
        if attributes & ATTRIBUTE_MR_EXTEND:
            raise _fail(f"{where}: MR.EXTEND of VMM-made memory cannot be computed from files")
    return TdvfSection(data_offset, raw_size, address, size, kind, attributes)


def parse_tdvf(firmware: bytes) -> TdvfMetadata:
    """Parse the TDVF metadata of `firmware` as QEMU does (hw/i386/tdvf.c), refusing any
    image QEMU would refuse and any out-of-bounds section."""
    fw = bytes(firmware)
    if not fw or len(fw) % FIRMWARE_ALIGN or len(fw) > FIRMWARE_MAX:
        raise _fail(
            f"firmware is {len(fw)} bytes, not a non-zero multiple of 64 KiB up to 64 MiB "
            f"(QEMU loads no other -bios image); {_GIVE_TDVF}"
        )
    data = _ovmf_table_entry(fw, TDX_METADATA_OFFSET_GUID)
    if data is None:
        raise _fail(
            f"firmware has no TDX metadata entry (GUID {TDX_METADATA_OFFSET_GUID}) in its "
            f"OVMF table: not a TDVF; {_GIVE_TDVF}"
        )
    if len(data) < _METADATA_OFFSET.size:
        raise _fail(f"TDX metadata offset entry is {len(data)} bytes, shorter than 4")
    (from_end,) = _METADATA_OFFSET.unpack_from(data)
    offset = len(fw) - from_end
    if from_end > len(fw) or offset + _DESCRIPTOR.size > len(fw):
        raise _fail(f"TDX metadata offset 0x{from_end:x} points outside the firmware")
    signature, length, version, count = _DESCRIPTOR.unpack_from(fw, offset)
    if signature != TDVF_SIGNATURE:
        raise _fail(f"TDX metadata at 0x{offset:x} has signature {signature!r}, not b'TDVF'")
    if offset + length > len(fw):
        raise _fail(f"TDX metadata at 0x{offset:x} has length {length}, past the firmware end")
    if version != TDVF_VERSION:
        raise _fail(f"TDX metadata version {version} is not supported (only 1 is defined)")
    if not 2 <= count <= MAX_SECTIONS:
        raise _fail(f"TDX metadata has {count} sections, outside 2..{MAX_SECTIONS}")
    if length != _DESCRIPTOR.size + count * _SECTION.size:
        raise _fail(f"TDX metadata length {length} does not match its {count} sections")
    sections = tuple(
        _parse_section(len(fw), i, _SECTION.unpack_from(fw, offset + _DESCRIPTOR.size + i * 32))
        for i in range(count)
    )
    if not any(s.type is TdvfSectionType.TD_HOB for s in sections):
        raise _fail("TDX metadata has no TD_HOB section, which QEMU requires")
    if sum(s.pages for s in sections) > MAX_TOTAL_PAGES:
        raise _fail(f"TDX metadata sections add more than {MAX_TOTAL_PAGES} pages")
    return TdvfMetadata(offset=offset, sections=sections)


class PageOrder(enum.Enum):
    """In which order the VMM issues TDH.MEM.PAGE.ADD and TDH.MR.EXTEND within a section."""

    #: Upstream KVM (Linux 6.16+, QEMU 10.1+): each page is added, then its 16 chunks
    #: extended, before the next page.
    PER_PAGE = "per-page"
    #: Some pre-upstream TDX stacks (e.g. QEMU 8.x builds): all pages of a section are
    #: added, then all of its chunks extended.
    TWO_PASS = "two-pass"  # noqa: S105 (an enum value, not a secret)


def _mr_record(operation: bytes, gpa: int) -> bytes:
    # TDX module ABI (TDH.MEM.PAGE.ADD, TDH.MR.EXTEND): a 128-byte buffer, the operation's
    # ASCII name at 0, the GPA little-endian at 16, zeros elsewhere.
    return operation.ljust(16, b"\0") + struct.pack("<Q", gpa) + bytes(104)


def compute_mrtd(
    firmware: bytes, metadata: TdvfMetadata, order: PageOrder = PageOrder.PER_PAGE
) -> bytes:
    """MRTD of a TD whose VMM adds `metadata`'s sections in order from `firmware`."""
    h = hashlib.sha384()

    def add(section: TdvfSection, page: int) -> None:
        h.update(_mr_record(b"MEM.PAGE.ADD", section.memory_address + page * PAGE_SIZE))

    def extend(section: TdvfSection, page: int) -> None:
        if not section.mr_extend:
            return
        for chunk in range(0, PAGE_SIZE, MR_EXTEND_CHUNK):
            offset = page * PAGE_SIZE + chunk
            h.update(_mr_record(b"MR.EXTEND", section.memory_address + offset))
            start = section.data_offset + offset
            h.update(firmware[start : start + MR_EXTEND_CHUNK])

    for section in metadata.sections:
        if order is PageOrder.PER_PAGE:
            for page in range(section.pages):
                add(section, page)
                extend(section, page)
        else:
            for page in range(section.pages):
                add(section, page)
            for page in range(section.pages):
                extend(section, page)
    return h.digest()


# --- the kernel: PE/COFF (for Authenticode) and the Linux setup header ---------------------

_DOS_MAGIC = b"MZ"
_DOS_LFANEW = struct.Struct("<I")  # at 0x3c
_PE_SIGNATURE = b"PE\0\0"
_COFF = struct.Struct("<HHIIIHH")  # Machine, NumberOfSections, TimeDateStamp,
#                                    PointerToSymbolTable, NumberOfSymbols,
#                                    SizeOfOptionalHeader, Characteristics
_SECTION_HEADER = struct.Struct("<8sIIIIIIHHI")  # Name, VirtualSize, VirtualAddress,
#                              SizeOfRawData, PointerToRawData, ..., Characteristics
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_DATA_DIRECTORY = struct.Struct("<II")  # VirtualAddress (file offset for security), Size


@dataclass(frozen=True, slots=True)
class _OptionalLayout:
    """Where the fields Authenticode needs sit in an optional header (PE/COFF spec)."""

    magic: int
    checksum: int
    size_of_headers: int
    number_of_rva_and_sizes: int
    data_directories: int


_OPTIONAL_LAYOUTS = {
    0x10B: _OptionalLayout(0x10B, checksum=64, size_of_headers=60,
                           number_of_rva_and_sizes=92, data_directories=96),  # PE32
    0x20B: _OptionalLayout(0x20B, checksum=64, size_of_headers=60,
                           number_of_rva_and_sizes=108, data_directories=112),  # PE32+
}  # fmt: skip
_SECURITY_DIRECTORY = 4
MAX_PE_SECTIONS = 96  # the PE/COFF spec's limit
KERNEL_MAX = 512 * MIB


@dataclass(frozen=True, slots=True)
class PeImage:
    """The parts of a PE/COFF image that its Authenticode digest depends on, all bounded."""

    size: int
    checksum_offset: int
    #: File offset of the Certificate Table directory entry; None if the header has none.
    cert_directory_offset: int | None
    cert_size: int
    size_of_headers: int
    #: (PointerToRawData, SizeOfRawData) of each section with raw data, sorted by offset.
    sections: tuple[tuple[int, int], ...]


_GIVE_KERNEL = "give a Linux bzImage built with CONFIG_EFI_STUB (an EFI PE/COFF image)"


def parse_pe(image: bytes) -> PeImage:
    """Parse the PE/COFF headers of `image` for an Authenticode digest, bounding every
    offset by the image (edk2's TdTcg2Dxe reads the same fields from the loaded file)."""
    n = len(image)
    if n > KERNEL_MAX:
        raise _fail(f"kernel is {n} bytes, more than {KERNEL_MAX // MIB} MiB")
    if n < 0x40 or image[:2] != _DOS_MAGIC:
        raise _fail(f"kernel is not a PE/COFF image (no 'MZ' DOS header); {_GIVE_KERNEL}")
    (pe,) = _DOS_LFANEW.unpack_from(image, 0x3C)
    coff = pe + len(_PE_SIGNATURE)
    optional = coff + _COFF.size
    if optional > n or image[pe:coff] != _PE_SIGNATURE:
        raise _fail(f"kernel has no 'PE' signature at 0x{pe:x}; {_GIVE_KERNEL}")
    _, count, _, _, _, optional_size, _ = _COFF.unpack_from(image, coff)
    if optional + 2 > n:
        raise _fail("kernel PE optional header lies past the end of the file")
    (magic,) = _U16.unpack_from(image, optional)
    layout = _OPTIONAL_LAYOUTS.get(magic)
    if layout is None:
        raise _fail(f"kernel PE optional header magic 0x{magic:x} is neither PE32 nor PE32+")
    if optional_size < layout.data_directories or optional + optional_size > n:
        raise _fail(f"kernel PE optional header size {optional_size} is out of bounds")
    (size_of_headers,) = _U32.unpack_from(image, optional + layout.size_of_headers)
    (rva_count,) = _U32.unpack_from(image, optional + layout.number_of_rva_and_sizes)
    directories_end = layout.data_directories + rva_count * _DATA_DIRECTORY.size
    if rva_count > 16 or directories_end > optional_size:
        raise _fail(f"kernel PE has {rva_count} data directories, out of bounds")
    if not 0 < count <= MAX_PE_SECTIONS:
        raise _fail(f"kernel PE has {count} sections, outside 1..{MAX_PE_SECTIONS}")
    table = optional + optional_size
    table_end = table + count * _SECTION_HEADER.size
    if table_end > size_of_headers or size_of_headers > n:
        raise _fail(
            f"kernel PE SizeOfHeaders 0x{size_of_headers:x} does not cover its section "
            f"table (ends at 0x{table_end:x}) within the 0x{n:x}-byte file"
        )
    cert_directory: int | None = None
    cert_size = 0
    if rva_count > _SECURITY_DIRECTORY:
        cert_directory = optional + layout.data_directories + 8 * _SECURITY_DIRECTORY
        _, cert_size = _DATA_DIRECTORY.unpack_from(image, cert_directory)
    sections = []
    for i in range(count):
        fields = _SECTION_HEADER.unpack_from(image, table + i * _SECTION_HEADER.size)
        raw_size, raw_pointer = fields[3], fields[4]
        if raw_size == 0:
            continue
        if raw_pointer + raw_size > n:
            raise _fail(
                f"kernel PE section {i} raw data 0x{raw_pointer:x}+0x{raw_size:x} lies past "
                f"the end of the 0x{n:x}-byte file"
            )
        sections.append((raw_pointer, raw_size))
    sections.sort()
    hashed = size_of_headers + sum(size for _, size in sections)
    if n > hashed and n < hashed + cert_size:
        raise _fail(f"kernel PE certificate table size 0x{cert_size:x} exceeds the file")
    return PeImage(
        size=n,
        checksum_offset=optional + layout.checksum,
        cert_directory_offset=cert_directory,
        cert_size=cert_size,
        size_of_headers=size_of_headers,
        sections=tuple(sections),
    )


def authenticode_digest(
    image: bytes, pe: PeImage, hash_factory: Callable[[], hashlib._Hash] = hashlib.sha384
) -> bytes:
    """The Authenticode digest of `image` exactly as edk2's MeasurePeImageAndExtend
    computes it (PE/COFF spec, "Calculating the PE Image Hash"): the headers less the
    checksum and the Certificate Table entry, the sections in file order, then any data
    past them less the certificate table. No padding is added: edk2 adds none."""
    h = hash_factory()
    h.update(image[: pe.checksum_offset])
    if pe.cert_directory_offset is None:
        h.update(image[pe.checksum_offset + 4 : pe.size_of_headers])
    else:
        h.update(image[pe.checksum_offset + 4 : pe.cert_directory_offset])
        h.update(image[pe.cert_directory_offset + 8 : pe.size_of_headers])
    hashed = pe.size_of_headers
    for pointer, size in pe.sections:
        h.update(image[pointer : pointer + size])
        hashed += size
    if pe.size > hashed + pe.cert_size:
        h.update(image[hashed : pe.size - pe.cert_size])
    return h.digest()


class KernelLoad(enum.Enum):
    """Which bytes of the kernel OVMF measures: the file, or QEMU's patched copy of it."""

    #: The file as given: QEMU >= 10.2 (no header patch for confidential guests), or
    #: QEMU >= 10.0 with OVMF >= edk2-stable202502 (OVMF loads fw_cfg etc/boot/kernel).
    AS_GIVEN = "as-given"
    #: QEMU < 10.2 with an OVMF that loads the patched setup (QEMU < 10.0, or OVMF < 202502):
    #: the setup header carries QEMU's loader type, heap end, command line and initrd
    #: address, so the digest depends on the initrd size and the VM's memory.
    QEMU_PATCHED = "qemu-patched"


# Linux boot protocol setup header (Documentation/arch/x86/boot.rst), as QEMU patches it.
_HDRS = b"HdrS"
_SETUP = {
    "setup_sects": (0x1F1, "B"),
    "vid_mode": (0x1FA, "H"),
    "version": (0x206, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "heap_end_ptr": (0x224, "H"),
    "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
}
_SETUP_HEADER_END = 0x268
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
# q35's acpi_data_size (hw/i386/pc_q35.c): QEMU keeps the initrd below it.
QEMU_ACPI_DATA_SIZE = 0x20000 + 0x8000


def _setup_get(kernel: bytes | bytearray, field: str) -> int:
    offset, fmt = _SETUP[field]
    value: int = struct.unpack_from("<" + fmt, kernel, offset)[0]
    return value


def _setup_put(kernel: bytearray, field: str, value: int) -> None:
    offset, fmt = _SETUP[field]
    struct.pack_into("<" + fmt, kernel, offset, value)


def _qemu_vga_mode(cmdline: str) -> int | None:
    """The video mode QEMU writes for a `vga=` parameter (x86_load_linux), if any."""
    at = cmdline.find("vga=")
    if at < 0:
        return None
    value = cmdline[at + 4 :]
    for word, mode in (("normal", 0xFFFF), ("ext", 0xFFFE), ("ask", 0xFFFD)):
        if value.startswith(word):
            return mode
    token = value.split(" ", 1)[0]
    base = 16 if token[:2].lower() == "0x" else 8 if token[:1] == "0" and len(token) > 1 else 10
    digits = token[2:] if base == 16 else token
    try:
        mode = int(digits, base) if digits else -1
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0xFFFFFFFF:
        raise _fail(f"cmdline has vga={token!r}, which QEMU refuses")
    return mode & 0xFFFF


def qemu_patch_kernel(kernel: bytes, initrd_size: int, cmdline: str, memory_mib: int) -> bytes:
    """The kernel image QEMU < 10.2 hands OVMF: the setup header patched as x86_load_linux
    patches it for a q35 machine with `memory_mib` of RAM."""
    if len(kernel) < _SETUP_HEADER_END or kernel[0x202:0x206] != _HDRS:
        raise _fail(f"kernel has no Linux setup header ('HdrS' at 0x202); {_GIVE_KERNEL}")
    protocol = _setup_get(kernel, "version")
    if protocol < 0x202 or not _setup_get(kernel, "loadflags") & LOADED_HIGH:
        raise _fail(f"kernel boot protocol 0x{protocol:x} is too old (2.02+, loaded high)")
    setup_sects = _setup_get(kernel, "setup_sects") or 4
    if (setup_sects + 1) * 512 > len(kernel):
        raise _fail("kernel setup_sects points past the end of the file")
    real_addr, cmdline_addr = 0x10000, 0x20000  # "high and recent kernel"
    if protocol >= 0x20C and _setup_get(kernel, "xloadflags") & XLF_CAN_BE_LOADED_ABOVE_4G:
        initrd_max = 0xFFFFFFFF
    elif protocol >= 0x203:
        initrd_max = _setup_get(kernel, "initrd_addr_max")
    else:
        initrd_max = 0x37FFFFFF
    ram = memory_mib * MIB
    lowmem = 0x80000000 if ram >= 0xB0000000 else 0xB0000000  # pc_q35_init
    below_4g = min(ram, lowmem)
    if initrd_max >= below_4g - QEMU_ACPI_DATA_SIZE:
        initrd_max = below_4g - QEMU_ACPI_DATA_SIZE - 1
    if initrd_size >= initrd_max:
        raise _fail(f"initrd of {initrd_size} bytes does not fit below 0x{initrd_max:x}")
    patched = bytearray(kernel)
    _setup_put(patched, "cmd_line_ptr", cmdline_addr)
    vga = _qemu_vga_mode(cmdline)
    if vga is not None:
        _setup_put(patched, "vid_mode", vga)
    _setup_put(patched, "type_of_loader", 0xB0)
    _setup_put(patched, "loadflags", patched[0x211] | CAN_USE_HEAP)
    _setup_put(patched, "heap_end_ptr", cmdline_addr - real_addr - 0x200)
    if initrd_size:
        _setup_put(patched, "ramdisk_image", (initrd_max - initrd_size) & ~0xFFF)
        _setup_put(patched, "ramdisk_size", initrd_size)
    return bytes(patched)


# --- the event logs ------------------------------------------------------------------------

# MdePkg/Include/IndustryStandard/UefiTcgPlatform.h; TdMeasureAction hashes them without NUL.
EFI_CALLING_EFI_APPLICATION = b"Calling EFI Application from Boot Option"
EFI_EXIT_BOOT_SERVICES_INVOCATION = b"Exit Boot Services Invocation"
EFI_EXIT_BOOT_SERVICES_SUCCEEDED = b"Exit Boot Services Returned with Success"
EV_SEPARATOR_DATA = bytes(4)
CMDLINE_MAX = 4096
INITRD_MAX = 0xFFFFFFFF  # fw_cfg sizes are 32-bit

RTMR0_REASON = (
    "RTMR0 is not computed from the boot files: it covers the ACPI tables QEMU generates "
    "(etc/table-loader, etc/acpi/rsdp, etc/acpi/tables), which depend on the QEMU version, "
    "machine type and devices, and the TD HOB, which depends on the memory layout; take it "
    "from the CCEL event log of a reference boot of the same VM shape"
)

LAUNCH_TD_ATTRIBUTES = (1 << 28).to_bytes(8, "little")
"""TD_ATTRIBUTES the VM must be launched with (8 bytes as the quote reports them): only
SEPT_VE_DISABLE (QEMU `-object tdx-guest,sept-ve-disable=on`), so that the host cannot
inject #VE through EPT violations; DEBUG, MIGRATABLE, PKS, KL and PERFMON clear. The host
chooses these at launch, not the boot files, so a policy pins them exactly."""

XFAM_NOTE = (
    "xfam is not pinned: it depends on the host CPU and the VM's CPU model, not on the "
    'boot files; add xfam = "<16 hex digits>" from a reference launch of the same VM shape'
)


def extend_chain(digests: tuple[bytes, ...]) -> bytes:
    """An RTMR after these extends: 48 zero bytes, then SHA-384(RTMR || digest) each."""
    rtmr = bytes(SHA384_SIZE)
    for digest in digests:
        rtmr = hashlib.sha384(rtmr + digest).digest()
    return rtmr


def _sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def load_options(cmdline: str, has_initrd: bool) -> bytes:
    """The LoadOptions OVMF's X86QemuLoadImageLib gives the kernel: the fw_cfg command
    line, " initrd=initrd" when an initrd is present, UTF-16LE, NUL-terminated; empty when
    both are empty. The Linux stub measures exactly these bytes."""
    text = cmdline + (" initrd=initrd" if has_initrd else "")
    return (text + "\0").encode("utf-16-le") if text else b""


@dataclass(frozen=True, slots=True)
class TdxMeasurement:
    """What a TDX quote of the VM reports, and the event digests behind each RTMR."""

    mrtd: bytes
    rtmr0: bytes | None
    rtmr0_reason: str
    rtmr1: bytes
    rtmr2: bytes
    #: The digests extended into RTMR1 and RTMR2, in order, to compare with a CCEL log.
    rtmr1_events: tuple[bytes, ...]
    rtmr2_events: tuple[bytes, ...]

    def __post_init__(self) -> None:
        values = [self.mrtd, self.rtmr1, self.rtmr2, *self.rtmr1_events, *self.rtmr2_events]
        if self.rtmr0 is not None:
            values.append(self.rtmr0)
        if any(len(v) != SHA384_SIZE for v in values):
            raise ValueError("every TDX measurement and event digest is 48 bytes")

    def as_hex(self) -> dict[str, str | None]:
        """The register values as lowercase hex, the form a `[tdx]` policy pins."""
        return {
            "mrtd": self.mrtd.hex(),
            "rtmr0": None if self.rtmr0 is None else self.rtmr0.hex(),
            "rtmr1": self.rtmr1.hex(),
            "rtmr2": self.rtmr2.hex(),
        }


def measure_tdx(
    firmware: bytes,
    kernel: bytes,
    initrd: bytes,
    cmdline: str,
    *,
    kernel_load: KernelLoad = KernelLoad.AS_GIVEN,
    memory_mib: int | None = None,
    page_order: PageOrder = PageOrder.PER_PAGE,
) -> TdxMeasurement:
    """MRTD, RTMR1 and RTMR2 (RTMR0: see `rtmr0_reason`) of a TD that QEMU boots with
    `-bios firmware -kernel kernel -initrd initrd -append cmdline`.

    `memory_mib` (the `-m` size) is needed only with `KernelLoad.QEMU_PATCHED`, where the
    patched initrd address depends on it. `cmdline` must be printable ASCII: OVMF widens
    each byte to one UTF-16 unit, so any other text would not measure as written.
    """
    if len(cmdline) > CMDLINE_MAX or not all(" " <= c <= "~" for c in cmdline):
        raise _fail(f"cmdline must be printable ASCII of at most {CMDLINE_MAX} characters")
    if not 0 < len(initrd) <= INITRD_MAX:
        raise _fail("initrd must be non-empty and under 4 GiB; give the cpio archive")
    metadata = parse_tdvf(firmware)
    mrtd = compute_mrtd(firmware, metadata, page_order)

    if kernel_load is KernelLoad.QEMU_PATCHED:
        if memory_mib is None or not 0 < memory_mib <= 1 << 22:
            raise _fail("memory_mib (QEMU -m, 1..4194304) is required with QEMU_PATCHED")
        kernel = qemu_patch_kernel(kernel, len(initrd), cmdline, memory_mib)
    pe = parse_pe(kernel)
    rtmr1_events = (
        authenticode_digest(kernel, pe),
        _sha384(EFI_CALLING_EFI_APPLICATION),
        _sha384(EV_SEPARATOR_DATA),
        _sha384(EFI_EXIT_BOOT_SERVICES_INVOCATION),
        _sha384(EFI_EXIT_BOOT_SERVICES_SUCCEEDED),
    )
    rtmr2_events = (_sha384(load_options(cmdline, has_initrd=True)), _sha384(initrd))
    return TdxMeasurement(
        mrtd=mrtd,
        rtmr0=None,
        rtmr0_reason=RTMR0_REASON,
        rtmr1=extend_chain(rtmr1_events),
        rtmr2=extend_chain(rtmr2_events),
        rtmr1_events=rtmr1_events,
        rtmr2_events=rtmr2_events,
    )
