"""Write the simulation PKI's private keys and the pinned simulation root certificate.

    python tools/make_simulation_pki.py          # (re)writes the committed files

The keys are derived from fixed public labels, so running this again reproduces the
committed files byte for byte: there is nothing secret to lose or to leak, because the
simulation PKI is insecure by design (anyone may forge simulation evidence; clients
accept the simulation root only when explicitly asked). Output:

    src/blindinfer/tee/simulation/keys/<name>.pem      PKCS#8 P-256 private keys
    src/blindinfer/attestation/roots/simulation_root.pem  the root built from root_ca.pem
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from blindinfer.tee.simulation import pki  # noqa: E402

# Order of the P-256 group: private scalars must lie in [1, n - 1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def derive_key(name: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key from a public label: reproducible, and obviously not a secret."""
    digest = hashlib.sha512(b"blindinfer SIMULATION key (public, insecure): " + name.encode())
    scalar = int.from_bytes(digest.digest(), "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def main() -> None:
    keys_dir = ROOT / "src/blindinfer/tee/simulation/keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys = {name: derive_key(name) for name in pki.KEY_NAMES}
    for name, key in keys.items():
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (keys_dir / f"{name}.pem").write_bytes(pem)
    root = pki.build_root_certificate(keys["root_ca"])
    root_pem = root.public_bytes(serialization.Encoding.PEM)
    (ROOT / "src/blindinfer/attestation/roots/simulation_root.pem").write_bytes(root_pem)
    print(f"wrote {len(keys)} keys and the simulation root ({root.subject.rfc4514_string()})")


if __name__ == "__main__":
    main()
