"""Writes the synthetic boot files of this folder (see README.md); run from the repo root.

Deterministic: the same bytes every run, so a change to a fixture shows in git.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = 0x1000


def stream(label: str, n: int) -> bytes:
    """n pseudo-random bytes named by label (SHA-256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


FOOTER = guid("96b582de-1fb2-45f7-baea-a366c55a082d")
MD_OFFSET = guid("e47a6535-984a-4798-865e-4685a7bf8ec2")
MD_GUID = guid("e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae")
AUTH_VARS = guid("aaf32c78-947b-439a-a180-2e144ec37792")
BFV, CFV, TD_HOB, TEMP_MEM = 0, 1, 2, 3


def tdvf(size: int, cfv_size: int, extra: list[tuple[int, int, int]]) -> bytes:
    """A firmware image laid out like edk2's TDVF: CFV (an empty authenticated variable
    store) first, then the BFV up to the end, holding the TDVF metadata and the OVMF GUIDed
    table in its last bytes. `extra` lists (type, address, size) of memory-only sections."""
    fw = bytearray(stream(f"tdvf-{size:x}", size))
    base = (1 << 32) - size
    # an empty variable store (the header edk2's VariableStore has) at the start of the CFV
    fw[0:28] = AUTH_VARS + struct.pack("<IBB6x", cfv_size, 0x5A, 0xFE)
    sections = [
        (cfv_size, size - cfv_size, base + cfv_size, size - cfv_size, BFV, 1),
        (0, cfv_size, base, cfv_size, CFV, 0),
        *((0, 0, address, length, kind, 0) for kind, address, length in extra),
    ]
    descriptor_at = size - 0x400
    length = 16 + 32 * len(sections)
    blob = MD_GUID + struct.pack("<4sIII", b"TDVF", length, 1, len(sections))
    blob += b"".join(struct.pack("<IIQQII", *s) for s in sections)
    fw[descriptor_at - 16 : descriptor_at - 16 + len(blob)] = blob
    entry = struct.pack("<IH", size - descriptor_at, 22) + MD_OFFSET
    footer = struct.pack("<H", 18 + len(entry)) + FOOTER
    table = entry + footer
    end = size - 32
    fw[end - len(table) : end] = table
    return bytes(fw)


def kernel() -> bytes:
    """A PE32+ image that is also a bzImage: DOS header, PE header at 0x40, a Linux setup
    header at 0x1f1 (protocol 2.15, loaded high, initrd above 4G allowed), two sections,
    and 0x100 bytes of data after them (which Authenticode hashes too)."""
    size_of_headers = 0x1000
    sections = [(b".setup\0\0", 0x1000, 0x2000), (b".text\0\0\0", 0x3000, 0x800)]
    end = 0x3800
    image = bytearray(stream("kernel", end + 0x100))
    image[0:0x40] = bytes(0x40)
    image[0:2] = b"MZ"
    struct.pack_into("<I", image, 0x3C, 0x40)
    image[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", image, 0x44, 0x8664, len(sections), 0, 0, 0, 240, 0x206)
    optional = bytearray(240)
    struct.pack_into("<HBBIIIII", optional, 0, 0x20B, 2, 20, 0x2800, 0, 0, 0x1000, 0x1000)
    struct.pack_into(
        "<QIIHHHHHHIIII",
        optional,
        24,
        0,
        0x1000,
        0x200,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0x4000,
        size_of_headers,
        0x5A5A5A5A,
    )  # checksum: excluded anyway
    struct.pack_into("<HHQQQQII", optional, 68, 10, 0, 0, 0, 0, 0, 0, 16)
    image[0x58 : 0x58 + 240] = optional
    table = 0x58 + 240
    for i, (name, pointer, raw) in enumerate(sections):
        struct.pack_into(
            "<8sIIIIIIHHI",
            image,
            table + 40 * i,
            name,
            raw,
            pointer,
            raw,
            pointer,
            0,
            0,
            0,
            0,
            0x60000020,
        )
    image[table + 40 * len(sections) : 0x1F1] = bytes(0x1F1 - table - 40 * len(sections))
    setup = {
        0x1F1: ("B", 7),
        0x1FA: ("H", 0xFFFF),
        0x202: ("4s", b"HdrS"),
        0x206: ("H", 0x020F),
        0x210: ("B", 0),
        0x211: ("B", 0x01),
        0x218: ("I", 0),
        0x21C: ("I", 0),
        0x224: ("H", 0),
        0x228: ("I", 0),
        0x22C: ("I", 0x7FFFFFFF),
        0x236: ("H", 0x000B),
        0x238: ("I", 2047),
    }
    for offset, (fmt, value) in setup.items():
        struct.pack_into("<" + fmt, image, offset, value)
    return bytes(image)


def cpio(files: dict[str, bytes]) -> bytes:
    """A newc cpio archive, the initramfs format."""
    out = bytearray()
    for ino, (name, data) in enumerate([*files.items(), ("TRAILER!!!", b"")], start=1):
        mode = 0o100644 if data or name != "TRAILER!!!" else 0
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out += b"070701" + b"".join(b"%08x" % f for f in fields)
        out += name.encode() + b"\0"
        out += bytes(-len(out) % 4) + data + bytes(-len(data) % 4)
    return bytes(out)


def main() -> None:
    (HERE / "tdvf-onepage.fd").write_bytes(
        tdvf(0x10000, 0xF000, [(TEMP_MEM, 0x800000, 0x2000), (TD_HOB, 0x809000, 0x1000)])
    )
    (HERE / "tdvf-multipage.fd").write_bytes(
        tdvf(
            0x40000,
            0x8000,
            [
                (TEMP_MEM, 0x800000, 0x4000),
                (TD_HOB, 0x809000, 0x1000),
                (TEMP_MEM, 0x80A000, 0x2000),
            ],
        )
    )
    (HERE / "kernel.efi").write_bytes(kernel())
    (HERE / "initrd.cpio").write_bytes(cpio({"init": b"#!/bin/sh\necho blindinfer\n"}))


if __name__ == "__main__":
    main()
