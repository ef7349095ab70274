"""`GramineSgxPlatform`: evidence from an SGX enclave run by Gramine (gramine-sgx).

Gramine exposes SGX attestation as pseudo-files under /dev/attestation:

- `attestation_type`: "none", "epid" or "dcap", from `sgx.remote_attestation` in the
  manifest. Only "dcap" produces quotes that dcap-qvl (and so our client) verifies.
- `user_report_data`: write 64 bytes; they become REPORTDATA of the next quote.
- `quote`: read it to get a DCAP quote over the last `user_report_data` written.
- `keys/_sgx_mrenclave`: the 16-byte SGX sealing key bound to MRENCLAVE (EGETKEY).

The pseudo-FS is one shared state per enclave and Gramine documents it as not
thread-safe: a write by one thread and a read by another would yield a quote over the
wrong report_data. So one lock spans each write+read pair. The quote's report_data is
not checked here: the client checks it against its TLS key and nonce, which is the check
that matters, and it refuses a mismatch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindinfer.attestation.intel.pccs import CollateralSource
from blindinfer.errors import BlindInferError
from blindinfer.tee.platform import REPORT_DATA_SIZE, Evidence

DEFAULT_ROOT: Final = Path("/dev/attestation")
GRAMINE_SEAL_KEY_SIZE: Final = 16
"""Gramine's keys/_sgx_* files hold 128-bit keys (SGX EGETKEY output)."""

MAX_QUOTE_SIZE: Final = 64 * 1024
"""SGX DCAP quotes with an embedded PCK chain are ~5 KiB; anything far larger is broken."""

SEALING_INFO: Final = b"blindinfer-seal/v1 gramine-sgx _sgx_mrenclave"
"""HKDF info: names the purpose, so this key never equals the raw key Gramine may also use
for encrypted mounts (Gramine's docs require a KDF before reusing the key)."""


class GramineError(BlindInferError):
    """Gramine's /dev/attestation is missing, misconfigured, or failed to answer."""


class GramineSgxPlatform:
    """The `Platform` of a gramine-sgx enclave with DCAP remote attestation."""

    def __init__(self, root: Path = DEFAULT_ROOT, *, collateral: CollateralSource) -> None:
        self._root = Path(root)
        self._collateral = collateral
        self._lock = threading.Lock()
        check_dcap(self._root)

    @property
    def kind(self) -> str:
        return "gramine-sgx"

    def evidence(self, report_data: bytes) -> Evidence:
        """A fresh DCAP quote over exactly `report_data` (64 bytes) with its collateral."""
        if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
        with self._lock:
            _write_exact(self._root / "user_report_data", report_data)
            quote = _read_bounded(self._root / "quote", MAX_QUOTE_SIZE)
        if not quote:
            raise GramineError(f"{self._root / 'quote'} returned no quote")
        return Evidence(
            kind="intel-sgx", quote=quote, collateral_json=self._collateral.collateral_json(quote)
        )

    def sealing_key(self) -> bytes:
        """32 bytes from HKDF-SHA256 over Gramine's MRENCLAVE-bound SGX sealing key.

        Only an enclave with the same MRENCLAVE on the same CPU gets the same input key,
        so data sealed with this key is bound to this exact enclave build.
        """
        path = self._root / "keys" / "_sgx_mrenclave"
        if not path.exists():
            raise GramineError(
                f"the SGX sealing key {path} does not exist (needs Gramine >= 1.3 running "
                "under gramine-sgx)"
            )
        key = _read_bounded(path, GRAMINE_SEAL_KEY_SIZE + 1)
        if len(key) != GRAMINE_SEAL_KEY_SIZE:
            raise GramineError(
                f"{path} holds {len(key)} bytes, expected a {GRAMINE_SEAL_KEY_SIZE}-byte key"
            )
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEALING_INFO)
        return hkdf.derive(key)


def check_dcap(root: Path) -> None:
    """Raise a `GramineError` naming what is missing unless `root` offers DCAP quotes."""
    type_file = root / "attestation_type"
    try:
        attestation_type = type_file.read_text(encoding="ascii").strip().strip("\0")
    except FileNotFoundError as exc:
        raise GramineError(
            f"{type_file} does not exist: this process is not running inside a Gramine "
            "enclave (start it with gramine-sgx, not gramine-direct or bare)"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise GramineError(f"cannot read {type_file}: {exc}") from exc
    if attestation_type != "dcap":
        raise GramineError(
            f"{type_file} is {attestation_type!r}, but DCAP attestation is required: set "
            'sgx.remote_attestation = "dcap" in the Gramine manifest and re-sign it'
        )
    for name in ("user_report_data", "quote"):
        if not (root / name).exists():
            raise GramineError(f"{root / name} is missing although attestation_type is 'dcap'")


def _write_exact(path: Path, data: bytes) -> None:
    """One write(2) of all bytes: Gramine's pseudo-file takes the report data per write."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise GramineError(f"cannot open {path} for writing: {exc}") from exc
    try:
        written = os.write(fd, data)
    except OSError as exc:
        raise GramineError(f"writing {path} failed: {exc}") from exc
    finally:
        os.close(fd)
    if written != len(data):
        raise GramineError(f"short write to {path}: {written} of {len(data)} bytes")


def _read_bounded(path: Path, limit: int) -> bytes:
    """Read a whole (pseudo-)file, refusing more than `limit` bytes."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise GramineError(f"reading {path} failed: {exc}") from exc
    if len(data) > limit:
        raise GramineError(f"{path} is larger than {limit} bytes")
    return data
