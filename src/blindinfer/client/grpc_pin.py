"""What a gRPC channel needs to trust exactly the attested certificate, for the client's
gRPC transport and the attesting proxy's gRPC side alike.

grpc's Python API takes no `ssl.SSLContext`: pinning is done by giving the attested
certificate as the channel's only root and checking the name it carries
(`grpc.ssl_target_name_override`), so the handshake succeeds with that certificate only.
Where the gRPC port is comes from the server's `GET /v2` (`grpc_port`), read over the
attested channel; it is not a security input, the certificate is pinned whatever the port.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from blindinfer.errors import ProtocolError


def certificate_pem(certificate_der: bytes) -> bytes:
    """The certificate as the PEM root grpc's channel credentials take."""
    certificate = x509.load_der_x509_certificate(certificate_der)
    return certificate.public_bytes(serialization.Encoding.PEM)


def certificate_name(certificate_der: bytes) -> str:
    """A name the certificate carries (its first DNS name, else its common name): the
    name the gRPC handshake checks, so that it checks the attested certificate only."""
    certificate = x509.load_der_x509_certificate(certificate_der)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns = names.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if dns:
        return str(dns[0])
    common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common and isinstance(common[0].value, str) and common[0].value:
        return common[0].value
    raise ProtocolError(
        "no_certificate_name",
        "the attested certificate names no host (no DNS name, no common name): gRPC cannot "
        "check it; use transport='https'",
    )


def announced_port(document: Any) -> int:
    """The `grpc_port` of the attested server's `GET /v2` answer; ProtocolError without one."""
    port = document.get("grpc_port") if isinstance(document, dict) else None
    if port is None:
        raise ProtocolError(
            "no_grpc_port",
            "the server announces no gRPC port (is it started with --grpc-port?); pass "
            "grpc_port= to connect() if it listens on one",
        )
    if type(port) is not int or not 1 <= port <= 65535:
        raise ProtocolError("malformed_answer", "the server's grpc_port is not a port number")
    return port


def grpc_target(host: str, port: int) -> str:
    """`host:port` as grpc writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
