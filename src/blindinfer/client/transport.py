"""TLS for the two phases of a connection.

Phase 1 (discovery) accepts any certificate, because the server's key is self-signed and
made inside the TEE: it only carries our nonce out and the evidence back, then we read the
certificate the handshake actually presented. Phase 2 (pinned) trusts exactly that
certificate and nothing else, so every later handshake fails before a request byte is
written if anyone else answers.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blindinfer.errors import ProtocolError
from blindinfer.protocol.evidence import MAX_EVIDENCE_BYTES, encode_nonce_request

NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass(frozen=True, slots=True)
class DiscoveredEvidence:
    body: bytes
    certificate_der: bytes


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"blindinfer connects over https only, got {url!r}")
    return url.rstrip("/")


def _discovery_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # trust comes from the evidence, checked after
    return context


def pinned_context(certificate_der: bytes) -> ssl.SSLContext:
    pem = (
        x509.load_der_x509_certificate(certificate_der)
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the name is meaningless; the key is what is attested
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pem)
    return context


def transport(context: ssl.SSLContext) -> httpx.HTTPTransport:
    return httpx.HTTPTransport(verify=context, socket_options=NO_DELAY)


def fetch_evidence(url: str, nonce: bytes, timeout: float) -> DiscoveredEvidence:
    """POSTs the nonce and returns the evidence with the certificate of THIS connection."""
    with (
        httpx.Client(transport=transport(_discovery_context()), timeout=timeout) as client,
        client.stream(
            "POST",
            url + "/v2/attestation",
            content=encode_nonce_request(nonce),
            headers={"content-type": "application/json"},
        ) as response,
    ):
        ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert(True) if ssl_object else None
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_EVIDENCE_BYTES:
                raise ProtocolError("too_large", "the server's evidence is too large")
        if response.status_code != 200:
            raise ProtocolError(
                "no_evidence", f"the server answered HTTP {response.status_code} for evidence"
            )
    if not certificate:
        raise ProtocolError("no_certificate", "the TLS handshake presented no certificate")
    return DiscoveredEvidence(bytes(body), certificate)
