"""The contract between the server and the TEE it runs in.

The server never builds evidence itself: it asks a `Platform` for evidence over a
64-byte report_data value that binds its TLS key and the client's nonce. Each TEE kind
(simulation here; Gramine-SGX, TDX and SEV-SNP later) implements this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

REPORT_DATA_SIZE = 64


@dataclass(frozen=True, slots=True)
class Evidence:
    """Evidence as a platform produced it, before it is put on the wire.

    `kind` names the evidence format ("intel-sgx", "intel-tdx", "amd-snp"), never the
    trust: which root it chains to is decided by the verifier from its pinned roots.
    `quote` is the raw evidence (a DCAP quote, or an SNP attestation report).
    `collateral_json` is the dcap-qvl `QuoteCollateralV3` JSON for Intel quotes ("" if the
    client must fetch collateral itself). `certificates` carries AMD's chip certificates
    by role ("vcek" or "vlek", and "ask"/"asvk"/"ark" when the platform supplies them).
    `crl` is AMD's CRL (DER) for SEV-SNP evidence, b"" when the platform has none: the
    client checks revocation with it and refuses its absence unless its policy allows.
    """

    kind: str
    quote: bytes
    collateral_json: str = ""
    certificates: tuple[tuple[str, bytes], ...] = ()
    crl: bytes = b""


class Platform(Protocol):
    """A TEE the server can ask for evidence and for a sealing key."""

    @property
    def kind(self) -> str:
        """Short name of the TEE ("simulation", "gramine-sgx", ...)."""
        ...

    def evidence(self, report_data: bytes) -> Evidence:
        """Evidence whose report_data is exactly `report_data` (64 bytes)."""
        ...

    def sealing_key(self) -> bytes:
        """A 32-byte key that only the same TEE identity can derive."""
        ...
