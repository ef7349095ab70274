"""TDX launch measurements from boot files: values checked against an independent
implementation (tests/assets/tdx-measure/README.md says which value against what)."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindinfer.errors import UsageError
from blindinfer.measure import tdx
from blindinfer.measure.tdx import KernelLoad, PageOrder, TdxInputError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tdx-measure"


def asset(name: str) -> bytes:
    return (ASSETS / name).read_bytes()


ONEPAGE = asset("tdvf-onepage.fd")
MULTIPAGE = asset("tdvf-multipage.fd")
KERNEL = asset("kernel.efi")
KERNEL_SIGNED = asset("kernel-signed.efi")
INITRD = asset("initrd.cpio")
CMDLINE = "console=ttyS0 ro"

# QUEX td-report-web d857138 docs/reproduce.mjs reproduceMrtd (two-pass order).
QUEX_MRTD_ONEPAGE = (
    "8738bc269e2251f911847d8675faf81681dda2a7c2aa61aca675e9f25aff370c"
    "1ccb982c921530d7da903675611e16cf"
)
QUEX_MRTD_MULTIPAGE = (
    "52c88291504c65f1480f8e7379a3fd58d2ad7035d1df84c987f94f5aed3cae34"
    "7c34ec82273863a4d8b62b38095c892d"
)
# Ours alone (no independent per-page vector for a multi-page MR.EXTEND section).
OWN_MRTD_MULTIPAGE_PER_PAGE = (
    "86fe942a1c1e04bb90d22f16bb9360f587821bd3b92733858e6f5b9b80f01f36"
    "b5e70179fc578c209e56c25c748dca3a"
)
# QUEX getPeHashPreimage + SHA-384, and osslsigncode 2.9 "Calculated message digest".
AUTHENTICODE_KERNEL = (
    "ee7d92e04ed4cb9d8b9a51aca25dd93a5e8b23c978a3f1505b170266a15a8339"
    "0d9d41eedd620379013c83f05fd144fd"
)
# The same, after QUEX qemuPatchKernel with initrd.cpio and CMDLINE, at -m 2048 / 1024.
AUTHENTICODE_PATCHED_2048 = (
    "b360c6b4b3a2454767fc39309ba4d68cc0a55d91a763f6e580b3189a24d0ce6c"
    "f5b91ac3524074b44e2f5751476290cf"
)
AUTHENTICODE_PATCHED_1024 = (
    "0fb7409bbadd70dff434ca8a8468c222df2ad0775f14a20ff7f08b156d65a670"
    "cdcb9b3dd83f1ad9fe1f38162c09e0fb"
)
# QUEX: sha384(utf16le("console=ttyS0 ro initrd=initrd\0")), sha384(initrd.cpio).
QUEX_CMDLINE_EVENT = (
    "cd4841e1a13d27c9d912c95cee32dae904c4d1601b0ec84b6d3441b3a3021366"
    "14a8f30af15ae90027a29fa9135b1022"
)
QUEX_INITRD_EVENT = (
    "084b8ef8e539b9ca5b8bf9e4451de699e44fbc1e250e0818a438947f50796986"
    "fd90f28764f0b569cf123321d45b399f"
)
# Chains of the digests above (RTMR1 event list from edk2-stable202502 TdTcg2Dxe).
RTMR1_AS_GIVEN = (
    "e707eeb9f3938f176209163a4d3183ab36b603c4f908276c22fb1e9fbb2a256a"
    "2eb35af5860d933726d80e10f6319f23"
)
RTMR1_PATCHED_2048 = (
    "b854872481ecabf1435826384e1eb8328b7b0502fb480b8ec67907624da6d694"
    "08b1dd046b668eeae655674cfa1a52c0"
)
RTMR2 = (
    "c598b9ce95fcf092de5f16f71d884ead4da56fb03be152a7dc3eb2574f06a9a4"
    "e4d648335cad319a98e4b80d17eb003c"
)


# --- MRTD -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("firmware", "order", "expected"),
    [
        (ONEPAGE, PageOrder.TWO_PASS, QUEX_MRTD_ONEPAGE),
        (ONEPAGE, PageOrder.PER_PAGE, QUEX_MRTD_ONEPAGE),
        (MULTIPAGE, PageOrder.TWO_PASS, QUEX_MRTD_MULTIPAGE),
        (MULTIPAGE, PageOrder.PER_PAGE, OWN_MRTD_MULTIPAGE_PER_PAGE),
    ],
)
def test_mrtd_matches_reference(firmware: bytes, order: PageOrder, expected: str) -> None:
    assert tdx.compute_mrtd(firmware, tdx.parse_tdvf(firmware), order).hex() == expected


def test_metadata_is_parsed_in_order() -> None:
    md = tdx.parse_tdvf(MULTIPAGE)
    assert md.offset == 0x40000 - 0x400
    assert [(s.type.name, s.memory_address, s.pages, s.mr_extend) for s in md.sections] == [
        ("BFV", 0xFFFC8000, 56, True),
        ("CFV", 0xFFFC0000, 8, False),
        ("TEMP_MEM", 0x800000, 4, False),
        ("TD_HOB", 0x809000, 1, False),
        ("TEMP_MEM", 0x80A000, 2, False),
    ]


def test_mrtd_covers_the_extended_bytes_only() -> None:
    md = tdx.parse_tdvf(MULTIPAGE)
    cfv_flipped = bytearray(MULTIPAGE)
    cfv_flipped[0x100] ^= 1  # in the CFV: added, not extended
    bfv_flipped = bytearray(MULTIPAGE)
    bfv_flipped[0x9000] ^= 1  # in the BFV: extended
    assert tdx.compute_mrtd(bytes(cfv_flipped), md).hex() == OWN_MRTD_MULTIPAGE_PER_PAGE
    assert tdx.compute_mrtd(bytes(bfv_flipped), md).hex() != OWN_MRTD_MULTIPAGE_PER_PAGE


# --- Authenticode and QEMU's kernel patch ---------------------------------------------------


@pytest.mark.parametrize("kernel", [KERNEL, KERNEL_SIGNED], ids=["unsigned", "signed"])
def test_authenticode_matches_reference(kernel: bytes) -> None:
    assert tdx.authenticode_digest(kernel, tdx.parse_pe(kernel)).hex() == AUTHENTICODE_KERNEL


@pytest.mark.parametrize(
    ("memory_mib", "expected"),
    [
        (2048, AUTHENTICODE_PATCHED_2048),
        (4096, AUTHENTICODE_PATCHED_2048),  # >= 0xb0000000: 2 GiB below 4G, as at 2048
        (1024, AUTHENTICODE_PATCHED_1024),
    ],
)
def test_qemu_patched_kernel_matches_reference(memory_mib: int, expected: str) -> None:
    patched = tdx.qemu_patch_kernel(KERNEL, len(INITRD), CMDLINE, memory_mib)
    assert tdx.authenticode_digest(patched, tdx.parse_pe(patched)).hex() == expected
    # the initrd sits page-aligned below 2 GiB less QEMU's 0x28000 of ACPI data
    below = min(memory_mib << 20, 0x80000000) - 0x28000 - 1
    assert struct.unpack_from("<II", patched, 0x218) == ((below - len(INITRD)) & ~0xFFF, 268)
    assert patched[0x210] == 0xB0 and patched[0x211] == 0x81


def test_qemu_patch_handles_vga() -> None:
    patched = tdx.qemu_patch_kernel(KERNEL, len(INITRD), "vga=0x317 quiet", 2048)
    assert struct.unpack_from("<H", patched, 0x1FA) == (0x317,)
    with pytest.raises(TdxInputError, match=r"^cmdline has vga='x1', which QEMU refuses$"):
        tdx.qemu_patch_kernel(KERNEL, len(INITRD), "vga=x1", 2048)


# --- measure_tdx ----------------------------------------------------------------------------


def test_measure_as_given() -> None:
    m = tdx.measure_tdx(MULTIPAGE, KERNEL, INITRD, CMDLINE)
    assert m.as_hex() == {
        "mrtd": OWN_MRTD_MULTIPAGE_PER_PAGE,
        "rtmr0": None,
        "rtmr1": RTMR1_AS_GIVEN,
        "rtmr2": RTMR2,
    }
    assert m.rtmr0_reason.startswith("RTMR0 is not computed from the boot files")
    assert m.rtmr1_events[0].hex() == AUTHENTICODE_KERNEL
    assert m.rtmr1_events[1:] == tuple(
        hashlib.sha384(e).digest()
        for e in (
            b"Calling EFI Application from Boot Option",
            b"\0\0\0\0",
            b"Exit Boot Services Invocation",
            b"Exit Boot Services Returned with Success",
        )
    )
    assert [e.hex() for e in m.rtmr2_events] == [QUEX_CMDLINE_EVENT, QUEX_INITRD_EVENT]


def test_measure_qemu_patched_two_pass() -> None:
    m = tdx.measure_tdx(
        ONEPAGE,
        KERNEL_SIGNED,
        INITRD,
        CMDLINE,
        kernel_load=KernelLoad.QEMU_PATCHED,
        memory_mib=2048,
        page_order=PageOrder.TWO_PASS,
    )
    assert m.mrtd.hex() == QUEX_MRTD_ONEPAGE
    assert m.rtmr1_events[0].hex() == AUTHENTICODE_PATCHED_2048
    assert m.rtmr1.hex() == RTMR1_PATCHED_2048
    assert m.rtmr2.hex() == RTMR2


def test_load_options_follow_ovmf() -> None:
    assert tdx.load_options("", has_initrd=False) == b""
    assert tdx.load_options("", has_initrd=True) == " initrd=initrd\0".encode("utf-16-le")
    assert tdx.load_options("quiet", has_initrd=False) == "quiet\0".encode("utf-16-le")


# --- refusals -------------------------------------------------------------------------------

GIVE_TDVF = "give an OVMF image built with TDX support (edk2 OvmfPkg/IntelTdx/IntelTdxX64.dsc)"
DESCRIPTOR = 0x10000 - 0x400  # in tdvf-onepage.fd
SECTION0 = DESCRIPTOR + 16


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("firmware", "message"),
    [
        (
            asset("ovmf-debian-code-tail.fd"),
            "firmware has no TDX metadata entry (GUID e47a6535-984a-4798-865e-4685a7bf8ec2) "
            f"in its OVMF table: not a TDVF; {GIVE_TDVF}",
        ),
        (
            ONEPAGE[:-0x1000],
            "firmware is 61440 bytes, not a non-zero multiple of 64 KiB up to 64 MiB "
            f"(QEMU loads no other -bios image); {GIVE_TDVF}",
        ),
        (
            bytes(0x10000),
            "firmware has no OVMF table footer (GUID 96b582de-1fb2-45f7-baea-a366c55a082d) "
            f"48 bytes before its end: not OVMF/TDVF; {GIVE_TDVF}",
        ),
        (
            patched(ONEPAGE, 0x10000 - 32 - 18 - 22, "I", 8),
            "TDX metadata offset 0x8 points outside the firmware",
        ),
        (
            patched(ONEPAGE, DESCRIPTOR + 4, "I", 0x500),
            "TDX metadata at 0xfc00 has length 1280, past the firmware end",
        ),
        (
            patched(ONEPAGE, DESCRIPTOR + 12, "I", 5),
            "TDX metadata length 144 does not match its 5 sections",
        ),
        (
            patched(ONEPAGE, DESCRIPTOR, "I", int.from_bytes(b"TDVX", "little")),
            "TDX metadata at 0xfc00 has signature b'TDVX', not b'TDVF'",
        ),
        (
            patched(ONEPAGE, SECTION0, "I", 0xF800),
            "TDVF section 0 (BFV): data 0xf800+0x1000 lies outside the 0x10000-byte firmware",
        ),
        (
            patched(ONEPAGE, SECTION0 + 8, "Q", 0xFFFFF800),
            "TDVF section 0 (BFV): address 0xfffff800 or size 0x1000 is not page-aligned",
        ),
        (
            patched(ONEPAGE, SECTION0 + 24, "I", 9),
            "TDVF section 0 has type 9, which QEMU does not support",
        ),
        (
            patched(ONEPAGE, SECTION0 + 28, "I", 3),
            "TDVF section 0 (BFV): attributes 0x3 other than MR.EXTEND are not supported",
        ),
        (
            patched(ONEPAGE, 0x10000 - 32 - 18, "H", 0xFFFF),
            "OVMF table length 65535 is out of bounds of the firmware",
        ),
    ],
    ids=[
        "debian-ovmf-not-tdvf",
        "not-64k-multiple",
        "no-footer",
        "metadata-offset-out-of-bounds",
        "metadata-truncated",
        "metadata-length-mismatch",
        "bad-signature",
        "section-data-out-of-bounds",
        "section-unaligned",
        "section-unknown-type",
        "section-unknown-attribute",
        "table-length-out-of-bounds",
    ],
)
def test_firmware_refusals(firmware: bytes, message: str) -> None:
    with pytest.raises(TdxInputError) as caught:
        tdx.parse_tdvf(firmware)
    assert str(caught.value) == message
    assert isinstance(caught.value, UsageError)


GIVE_KERNEL = "give a Linux bzImage built with CONFIG_EFI_STUB (an EFI PE/COFF image)"


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        (INITRD, f"kernel is not a PE/COFF image (no 'MZ' DOS header); {GIVE_KERNEL}"),
        (patched(KERNEL, 0x40, "I", 0), f"kernel has no 'PE' signature at 0x40; {GIVE_KERNEL}"),
        (
            KERNEL[:0x3000],
            "kernel PE section 1 raw data 0x3000+0x800 lies past the end of the 0x3000-byte file",
        ),
        (
            patched(KERNEL, 0x58 + 60, "I", 0x100),
            "kernel PE SizeOfHeaders 0x100 does not cover its section table (ends at 0x198) "
            "within the 0x3900-byte file",
        ),
    ],
    ids=["not-mz", "no-pe-signature", "section-truncated", "headers-too-small"],
)
def test_kernel_refusals(kernel: bytes, message: str) -> None:
    with pytest.raises(TdxInputError) as caught:
        tdx.parse_pe(kernel)
    assert str(caught.value) == message


def test_patch_needs_a_bzimage_header() -> None:
    with pytest.raises(TdxInputError) as caught:
        tdx.qemu_patch_kernel(patched(KERNEL, 0x202, "I", 0), 1, "", 2048)
    assert str(caught.value) == f"kernel has no Linux setup header ('HdrS' at 0x202); {GIVE_KERNEL}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"cmdline": "caf\u00e9"},
            "cmdline must be printable ASCII of at most 4096 characters",
        ),
        (
            {"initrd": b""},
            "initrd must be non-empty and under 4 GiB; give the cpio archive",
        ),
        (
            {"kernel_load": KernelLoad.QEMU_PATCHED},
            "memory_mib (QEMU -m, 1..4194304) is required with QEMU_PATCHED",
        ),
    ],
    ids=["non-ascii-cmdline", "empty-initrd", "patched-without-memory"],
)
def test_measure_refusals(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"cmdline": CMDLINE, "initrd": INITRD, **kwargs}
    with pytest.raises(TdxInputError) as caught:
        tdx.measure_tdx(ONEPAGE, KERNEL, **args)  # type: ignore[arg-type]
    assert str(caught.value) == message


# --- property tests: parsers never fail other than with TdxInputError ------------------------


def _mutate(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(base)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out)


# Edits aimed at the metadata and table region, where a parser can go wrong.
_TAIL_EDITS = st.lists(
    st.tuples(st.integers(0x10000 - 0x400 - 16, 0x10000 - 1), st.integers(0, 255)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(_TAIL_EDITS)
def test_tdvf_parser_total_on_mutations(edits: list[tuple[int, int]]) -> None:
    firmware = _mutate(ONEPAGE, edits)
    try:
        md = tdx.parse_tdvf(firmware)
    except TdxInputError:
        return
    for s in md.sections:  # whatever parsed is within the bounds measure relies on
        assert s.memory_data_size % 0x1000 == 0 < s.memory_data_size
        if s.type in (tdx.TdvfSectionType.BFV, tdx.TdvfSectionType.CFV):
            assert s.data_offset + s.memory_data_size <= len(firmware)
    assert len(tdx.compute_mrtd(firmware, md)) == 48


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x200), st.integers(0, 255)), min_size=1, max_size=8))
def test_pe_parser_total_on_mutations(edits: list[tuple[int, int]]) -> None:
    kernel = _mutate(KERNEL, edits)
    try:
        pe = tdx.parse_pe(kernel)
    except TdxInputError:
        return
    assert all(p + n <= len(kernel) for p, n in pe.sections)
    assert pe.size_of_headers <= len(kernel)
    assert len(tdx.authenticode_digest(kernel, pe)) == 48


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=0x400))
def test_parsers_refuse_random_bytes(data: bytes) -> None:
    with pytest.raises(TdxInputError):
        tdx.parse_tdvf(data)
    with contextlib.suppress(TdxInputError):  # any other exception fails the test
        tdx.parse_pe(data)
