"""A small firmware image laid out like OVMF's AmdSevX64 build, for measuring tests.

sev-snp-measure reads only the OVMF footer table (at 4 GiB - 32 bytes), the SEV metadata
it points to and the pages the metadata names; this builds exactly those, so a unit test
needs neither the 4 MiB edk2 build nor a file from outside the repository.
"""

from __future__ import annotations

import struct
import uuid

FOOTER_GUID = "96b582de-1fb2-45f7-baea-a366c55a082d"
SEV_HASH_TABLE_RV_GUID = "7255371f-3a3b-4b04-927b-1da6efa8d454"
SEV_ES_RESET_BLOCK_GUID = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
SEV_METADATA_GUID = "dc886566-984a-4798-a75e-5585a7bf67cc"

SNP_SEC_MEM, SNP_SECRETS, CPUID, SNP_KERNEL_HASHES = 1, 2, 3, 0x10
SIZE = 64 * 1024
GPA = 0x1_0000_0000 - SIZE


def _entry(guid: str, data: bytes) -> bytes:
    return data + struct.pack("<H", len(data) + 18) + uuid.UUID(guid).bytes_le


def amdsev_firmware(*, kernel_hashes: bool = True, fill: int = 0x5A) -> bytes:
    """Firmware bytes whose measurement depends on every part sev-snp-measure reads."""
    sections = [(0x80_0000, 0x9000, SNP_SEC_MEM), (0x80_9000, 0x1000, SNP_SECRETS)]
    sections.append((0x80_A000, 0x1000, CPUID))
    if kernel_hashes:
        sections.append((0x80_B000, 0x1000, SNP_KERNEL_HASHES))
    metadata = b"ASEV" + struct.pack("<III", 16 + 12 * len(sections), 1, len(sections))
    metadata += b"".join(struct.pack("<III", *section) for section in sections)
    image = bytearray(bytes([fill]) * SIZE)
    metadata_at = 0x100
    image[metadata_at : metadata_at + len(metadata)] = metadata
    table = _entry(SEV_HASH_TABLE_RV_GUID, struct.pack("<II", 0x80_B000, 0x1000))
    table += _entry(SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", GPA + 0xF000))
    table += _entry(SEV_METADATA_GUID, struct.pack("<I", SIZE - metadata_at))
    table += struct.pack("<H", len(table) + 18) + uuid.UUID(FOOTER_GUID).bytes_le
    end = SIZE - 32
    image[end - len(table) : end] = table
    return bytes(image)
