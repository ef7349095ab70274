"""AMD's SEV-SNP root (ARK) and signing keys (ASK for VCEKs, ASVK for VLEKs), pinned.

An SNP report is signed by a chip key (VCEK) or a cloud-loaded key (VLEK) whose
certificate arrives with the evidence; it is only worth anything if it chains to AMD.
The chain supplied with the evidence is never trusted as a root: the verifier uses the
certificates shipped here, which are loaded at import and refused unless each SHA-256
fingerprint (of the DER) is exactly the one pinned below.

Provenance: the PEMs are AMD's published KDS certificates (kdsintf.amd.com
/vcek/v1/<product>/cert_chain and /vlek/v1/<product>/cert_chain) as vendored by
google/go-sev-guest verify/trust/ (@af1c107); every fingerprint was cross-checked against
two independent copies: virtee/sev src/certs/snp/builtin/ (ARK, ASK) and
confidential-containers/trustee deps/verifier/src/snp/*_ask_ark_asvk.pem (ARK, ASK, ASVK).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

_PINNED_SHA256: Final[Mapping[str, str]] = MappingProxyType(
    {
        "milan_ark.pem": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        "milan_ask.pem": "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
        "milan_asvk.pem": "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
        "genoa_ark.pem": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        "genoa_ask.pem": "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
        "genoa_asvk.pem": "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
        "turin_ark.pem": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
        "turin_ask.pem": "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
        "turin_asvk.pem": "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
    }
)
"""SHA-256 of the DER of every shipped certificate; a mismatch stops the import."""


@dataclass(frozen=True, slots=True)
class AmdProductRoots:
    """The pinned certificates (DER) of one SEV-SNP product line.

    `asvk_der` is None for a product whose VLEK signing key is not pinned: VLEK reports
    from it are then refused.
    """

    name: str
    ark_der: bytes
    ask_der: bytes
    asvk_der: bytes | None

    @property
    def ark_sha256(self) -> str:
        """Lower-case hex SHA-256 of the ARK's DER, for logs and error messages."""
        return hashlib.sha256(self.ark_der).hexdigest()


def _load_der(filename: str) -> bytes:
    """The DER of a shipped PEM, refused unless its fingerprint is the pinned one."""
    pem = resources.files(__name__).joinpath(filename).read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    if hashlib.sha256(der).hexdigest() != _PINNED_SHA256[filename]:
        # not `assert`: must survive `python -O`
        raise RuntimeError(f"the shipped {filename} is not AMD's pinned certificate")
    return der


def _product(name: str) -> AmdProductRoots:
    prefix = name.lower()
    return AmdProductRoots(
        name=name,
        ark_der=_load_der(f"{prefix}_ark.pem"),
        ask_der=_load_der(f"{prefix}_ask.pem"),
        asvk_der=_load_der(f"{prefix}_asvk.pem"),
    )


AMD_PRODUCTS: Final[Mapping[str, AmdProductRoots]] = MappingProxyType(
    {name: _product(name) for name in ("Milan", "Genoa", "Turin")}
)
"""Product name (as in the certificates' CN, e.g. "ARK-Milan") -> its pinned roots."""

__all__ = ["AMD_PRODUCTS", "AmdProductRoots"]
