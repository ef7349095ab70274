"""The SEV-SNP launch MEASUREMENT of a boot set, computed by VirTEE's `sev-snp-measure`.

We call the library instead of re-implementing the PSP's page-by-page digest: it is the
tool AMD's ecosystem (Kata, Contrast, Trustee) checks its values against, so agreeing with
it byte for byte is the point. The measurement covers the firmware pages, the initial VMSA
of every vCPU (hence the vCPU count and type), and, through the firmware's
SNP_KERNEL_HASHES page, the SHA-256 of kernel, initrd and command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from blindinfer.errors import UsageError
from blindinfer.measure.bootset import BootSet

DEFAULT_VCPUS: Final = 1
DEFAULT_VCPU_TYPE: Final = "EPYC-v4"
DEFAULT_GUEST_FEATURES: Final = 0x1  # SNPActive, as QEMU sets it and sev-snp-measure defaults
MAX_VCPUS: Final = 512


@dataclass(frozen=True, slots=True)
class SnpMeasurement:
    measurement: bytes
    vcpus: int
    vcpu_type: str
    guest_features: int


def vcpu_types() -> tuple[str, ...]:
    from sevsnpmeasure import vcpu_types as types

    return tuple(types.CPU_SIGS)


def measure_snp(
    bootset: BootSet,
    *,
    vcpus: int = DEFAULT_VCPUS,
    vcpu_type: str = DEFAULT_VCPU_TYPE,
    guest_features: int = DEFAULT_GUEST_FEATURES,
) -> SnpMeasurement:
    from sevsnpmeasure import guest
    from sevsnpmeasure import vcpu_types as types
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vmm_types import VMMType

    if not 1 <= vcpus <= MAX_VCPUS:
        raise UsageError(f"--vcpus must be between 1 and {MAX_VCPUS}, got {vcpus}")
    if vcpu_type not in types.CPU_SIGS:
        raise UsageError(
            f"unknown --vcpu-type '{vcpu_type}'; QEMU's AMD types: {', '.join(types.CPU_SIGS)}"
        )
    try:
        digest = guest.calc_launch_digest(
            SevMode.SEV_SNP,
            vcpus,
            types.CPU_SIGS[vcpu_type],
            str(bootset.firmware),
            str(bootset.kernel),
            str(bootset.initrd),
            bootset.cmdline,
            guest_features,
            "",
            VMMType.QEMU,
        )
    except (RuntimeError, ValueError) as exc:
        raise UsageError(
            f"cannot measure {bootset.firmware.name} for SEV-SNP: {exc}; the firmware must be "
            "an AmdSev OVMF build with SNP_KERNEL_HASHES (deploy/image/build-firmware.sh)"
        ) from exc
    return SnpMeasurement(bytes(digest), vcpus, vcpu_type, guest_features)
