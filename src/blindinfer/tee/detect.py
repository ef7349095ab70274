"""Which real TEE, if any, this process runs in, from the interfaces the OS exposes.

Detection only looks (and, for configfs-tsm, opens and removes an entry to read its
`provider`): it never generates evidence, so it never asks hardware to sign a constant
report_data. Roots are parameters so that tests and unusual mounts can point elsewhere.

- gramine-sgx: Gramine creates /dev/attestation/attestation_type inside an SGX enclave.
- tdx / snp: configfs-tsm (/sys/kernel/config/tsm/report) exists in TDX and SEV-SNP
  guests with Linux >= 6.7. Which one is decided by the report provider; the guest
  drivers' device nodes (/dev/tdx_guest, /dev/sev-guest) answer without touching
  configfs, and a probe entry answers when neither node is visible (containers).
- coco-tdx / coco-snp (tee/coco_agent.py) are never detected: detection makes no network
  calls, and a Confidential Containers pod names its platform in its manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from blindinfer.tee import configfs_tsm, gramine

log = logging.getLogger("blindinfer.tee.detect")

DEFAULT_DEV: Final = Path("/dev")
TDX_GUEST_DEVICE: Final = "tdx_guest"
SEV_GUEST_DEVICE: Final = "sev-guest"


def detect_platform(
    *,
    gramine_root: Path = gramine.DEFAULT_ROOT,
    tsm_root: Path = configfs_tsm.DEFAULT_ROOT,
    dev_root: Path = DEFAULT_DEV,
    probe: bool = True,
    fs: configfs_tsm.TsmFs | None = None,
) -> str | None:
    """ "gramine-sgx", "tdx", "snp", or None when no supported TEE interface is present.

    Gramine wins over configfs-tsm: an SGX enclave inside a confidential VM attests
    as the enclave, which is the smaller trusted base.
    """
    if (gramine_root / "attestation_type").exists():
        return "gramine-sgx"
    if not tsm_root.is_dir():
        return None
    tdx = (dev_root / TDX_GUEST_DEVICE).exists()
    snp = (dev_root / SEV_GUEST_DEVICE).exists()
    if tdx != snp:
        return "tdx" if tdx else "snp"
    if not probe:
        return None
    try:
        provider = configfs_tsm.probe_provider(tsm_root, fs=fs)
    except configfs_tsm.TsmError as exc:
        log.info("configfs-tsm present but unusable: %s", exc)
        return None
    return configfs_tsm.PLATFORM_KINDS.get(provider)


def describe_missing(
    *,
    gramine_root: Path = gramine.DEFAULT_ROOT,
    tsm_root: Path = configfs_tsm.DEFAULT_ROOT,
    dev_root: Path = DEFAULT_DEV,
) -> str:
    """What was looked for and not found, for the error a server prints when it refuses
    to start without a TEE."""
    return (
        "no TEE platform found: looked for Gramine SGX attestation "
        f"({gramine_root / 'attestation_type'}: run under gramine-sgx with "
        'sgx.remote_attestation = "dcap"), and for Linux configfs-tsm '
        f"({tsm_root}: a TDX or SEV-SNP guest with Linux >= 6.7, configfs mounted, and the "
        f"{dev_root / TDX_GUEST_DEVICE} or {dev_root / SEV_GUEST_DEVICE} driver loaded); in "
        "a Confidential Containers pod, name --platform coco-tdx or coco-snp (evidence from "
        "the Attestation Agent)"
    )
