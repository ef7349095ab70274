"""The server's TLS identity: a key pair made in memory at start-up, never stored.

Python's ssl module only loads keys from paths, so the PEM goes through an anonymous
memory file (memfd): it never touches a file system and disappears when closed. Where
memfd_create is missing (Gramine does not implement it), the key goes through a file in
the directory named by BLINDINFER_TLS_TMPDIR, which must be an in-enclave tmpfs (the
Gramine manifest template mounts one at /tmp and sets the variable), and is unlinked at
once. Without memfd and without that variable the server refuses to start.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import tempfile
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from blindinfer.protocol.receipts import es256_sign

CERTIFICATE_COMMON_NAME = "blindinfer-server"


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    certificate_der: bytes
    spki_sha256: bytes
    ssl_context: ssl.SSLContext
    _key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)

    def sign(self, message: bytes) -> bytes:
        """ES256 (r || s) over `message` with the TLS key, which never leaves memory."""
        return es256_sign(self._key, message)

    def pem_key_and_certificate(self) -> tuple[bytes, bytes]:
        """The key (PKCS#8) and certificate as PEM, for a TLS stack that takes bytes rather
        than an ssl.SSLContext (gRPC's server credentials). In memory, never written out."""
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        certificate = x509.load_der_x509_certificate(self.certificate_der)
        return key_pem, certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_id(self) -> str:
        """Hex SHA-256 of the key's SubjectPublicKeyInfo (= report_data[0:32])."""
        return self.spki_sha256.hex()


def spki_sha256(certificate: x509.Certificate) -> bytes:
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def make_tls_identity(common_name: str = CERTIFICATE_COMMON_NAME) -> TlsIdentity:
    """A fresh key pair and a self-signed certificate naming `common_name` (as CN and DNS
    SAN); the key lives in memory only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_from_memory(context, cert_pem + key_pem)
    return TlsIdentity(
        certificate_der=certificate.public_bytes(serialization.Encoding.DER),
        spki_sha256=spki_sha256(certificate),
        ssl_context=context,
        _key=key,
    )


TMPDIR_VARIABLE = "BLINDINFER_TLS_TMPDIR"


def _load_from_memory(context: ssl.SSLContext, pem: bytes) -> None:
    try:
        fd = os.memfd_create("blindinfer-tls", os.MFD_CLOEXEC)
    except OSError:
        _load_through_enclave_tmpfs(context, pem)
        return
    try:
        _write_all(fd, pem)
        path = f"/proc/self/fd/{fd}"
        context.load_cert_chain(certfile=path, keyfile=path)
    finally:
        os.close(fd)


def _load_through_enclave_tmpfs(context: ssl.SSLContext, pem: bytes) -> None:
    directory = os.environ.get(TMPDIR_VARIABLE)
    if not directory:
        raise RuntimeError(
            f"memfd_create is unavailable and {TMPDIR_VARIABLE} is not set: refusing to write "
            "the TLS key to a file system that may be visible to the host"
        )
    fd, path = tempfile.mkstemp(dir=directory, prefix=".tls-")
    try:
        _write_all(fd, pem)
        context.load_cert_chain(certfile=path, keyfile=path)
    finally:
        os.close(fd)
        os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
