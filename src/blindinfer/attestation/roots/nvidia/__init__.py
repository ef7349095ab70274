"""NVIDIA's Device Identity root CA, pinned: the only root a GPU's device chain may reach.

An H100 proves its identity with a certificate chain that the GPU itself hands out
(leaf "GSP FMC LF" ... "NVIDIA Device Identity CA"). Whoever controls the host controls
that chain too, so its last certificate proves nothing on its own: the verifier compares
it byte for byte with the copy shipped here. The copy is the `verifier_device_root.pem`
that NVIDIA publishes in github.com/NVIDIA/nvtrust (guest_tools/gpu_verifiers/
local_gpu_verifier/src/verifier/certs/); the same certificate is pinned by the
confidential-containers trustee verifier (deps/verifier/src/nvidia/nvidia_device_root.pem).
Its SHA-256 fingerprint is asserted at import so that an edited file fails loudly.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from blindinfer.attestation.roots import TrustRoot

__all__ = [
    "NVIDIA_DEVICE_ROOT",
    "NVIDIA_DEVICE_ROOT_SHA256",
    "nvidia_device_root_certificate",
]

NVIDIA_DEVICE_ROOT_SHA256: Final = (
    "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
)
"""SHA-256 of the DER of "CN=NVIDIA Device Identity CA, O=NVIDIA" (P-384, valid to 9999)."""

_PEM_NAME: Final = "nvidia_device_identity_root.pem"


def _load_der() -> bytes:
    """The DER of the shipped PEM (re-encoded, so PEM whitespace cannot change the pin)."""
    pem = resources.files(__name__).joinpath(_PEM_NAME).read_bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


NVIDIA_DEVICE_ROOT: Final = TrustRoot(
    name="NVIDIA Device Identity CA", der=_load_der(), simulation=False
)
if NVIDIA_DEVICE_ROOT.sha256 != NVIDIA_DEVICE_ROOT_SHA256:  # not `assert`: survives `python -O`
    raise RuntimeError(f"the shipped {_PEM_NAME} is not NVIDIA's Device Identity root CA")


def nvidia_device_root_certificate() -> x509.Certificate:
    """The pinned root as a certificate object (parsed afresh: callers cannot alter it)."""
    return x509.load_der_x509_certificate(NVIDIA_DEVICE_ROOT.der)
