"""The only root certificates a quote may chain to, shipped with the client.

A verifier must never take its root from the evidence: whoever makes the evidence would
then choose who vouches for it. Two roots are pinned here. Intel's SGX Root CA is the
real one. The simulation root belongs to blindinfer's simulated PKI, whose private keys
are public (they ship with the server), so anyone can forge evidence under it; the client
accepts it only when the caller explicitly asks for simulation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

INTEL_SGX_ROOT_SHA256: Final = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
"""Fingerprint (SHA-256 of the DER) of Intel's SGX Root CA, as Intel publishes it."""


@dataclass(frozen=True, slots=True)
class TrustRoot:
    """A pinned root certificate; `simulation` marks the insecure simulated PKI."""

    name: str
    der: bytes
    simulation: bool

    @property
    def sha256(self) -> str:
        """Lower-case hex SHA-256 of the DER, for logs and error messages."""
        return hashlib.sha256(self.der).hexdigest()


def _load_der(filename: str) -> bytes:
    pem = resources.files(__name__).joinpath(filename).read_bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


INTEL_SGX_ROOT: Final = TrustRoot(
    name="Intel SGX Root CA", der=_load_der("intel_sgx_root.pem"), simulation=False
)
if INTEL_SGX_ROOT.sha256 != INTEL_SGX_ROOT_SHA256:  # not `assert`: must survive `python -O`
    raise RuntimeError("the shipped intel_sgx_root.pem is not Intel's SGX Root CA")

SIMULATION_ROOT: Final = TrustRoot(
    name="Blindinfer SIMULATION SGX Root CA",
    der=_load_der("simulation_root.pem"),
    simulation=True,
)

PINNED_ROOTS: Final = (INTEL_SGX_ROOT, SIMULATION_ROOT)


def root_for_der(der: bytes) -> TrustRoot | None:
    """The pinned root whose DER is exactly `der`, or None: nothing else is trusted."""
    for root in PINNED_ROOTS:
        if root.der == der:
            return root
    return None
