"""TLS for the two phases of a connection.

Phase 1 (discovery) accepts any certificate, because the server's key is self-signed and
made inside the TEE: it only carries our nonce out and the evidence back, then we read the
certificate the handshake actually presented. Phase 2 (pinned) trusts exactly that
certificate and nothing else, so every later handshake fails before a request byte is
written if anyone else answers.

Failures of either phase leave here as blindinfer errors (`connection_failed`), never as
httpx's: `ConnectionFailedError` when the server cannot be reached or the connection broke,
`KeyBindingError` when a pinned connection meets a certificate other than the attested one;
the transport's exception stays chained as `__cause__`.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blindinfer.errors import (
    BlindInferError,
    ConnectionFailedError,
    KeyBindingError,
    ProtocolError,
    UsageError,
    causes,
)
from blindinfer.protocol.evidence import MAX_EVIDENCE_BYTES, encode_nonce_request

E = TypeVar("E", bound=BaseException)
NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass(frozen=True, slots=True)
class DiscoveredEvidence:
    body: bytes
    certificate_der: bytes


URL_HINT = "use https://host:port, e.g. https://127.0.0.1:9924"


def check_url(url: object) -> str:
    """The server's base URL without a trailing slash; UsageError unless `https://host[:port]`."""
    if not isinstance(url, str) or not url.strip():
        raise UsageError(f"no server URL given ({url!r}): {URL_HINT}")
    parts = urlsplit(url)
    if "://" not in url:
        raise UsageError(
            f"no scheme in {url!r}: use https://{url.lstrip('/')} "
            "(blindinfer connects over https only)"
        )
    if parts.scheme != "https":
        fixed = f"https://{parts.netloc}{parts.path}" if parts.netloc else "https://host:port"
        raise UsageError(
            f"blindinfer connects over https only, got {url!r}: use {fixed} "
            "(the server speaks TLS only)"
        )
    if not parts.hostname:
        raise UsageError(f"no host in {url!r}: {URL_HINT}")
    try:
        port = parts.port
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise UsageError(f"bad URL {url!r} ({exc}): {URL_HINT}") from exc
    if port == 0:
        raise UsageError(f"bad port 0 in {url!r}: {URL_HINT}, with a port from 1 to 65535")
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
        translated_errors(url, timeout, request="POST /v2/attestation", pinned=False),
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


# -- failures, in words ---------------------------------------------------------------------


@contextmanager
def translated_errors(
    url: str, timeout: float | None, *, request: str | None, pinned: bool
) -> Iterator[None]:
    """Raises httpx's (and the socket's) failures inside as blindinfer errors, chained."""
    try:
        yield
    except (httpx.RequestError, OSError) as exc:
        raise connection_failed(exc, url, timeout, request=request, pinned=pinned) from exc


def connection_failed(
    exc: BaseException,
    url: str,
    timeout: float | None,
    *,
    request: str | None = None,
    pinned: bool,
) -> BlindInferError:
    """The blindinfer error for a transport failure talking to `url` (the caller chains it).

    `request` ("POST /v2/...") names what was being sent; `pinned`: the connection trusts
    only the attested certificate, so a failed certificate check means someone else answers.
    """
    during = f" during {request}" if request else ""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        after = "" if timeout is None else f" after {timeout:g} s"
        phase = _timeout_phase(exc)
        if phase == "connecting to":
            during = ""
        return ConnectionFailedError(
            f"timed out{after} {phase} {url}{during} "
            "(is the server up and not overloaded? a larger timeout= waits longer)"
        )
    refused_certificate = _cause(exc, ssl.SSLCertVerificationError)
    if pinned and refused_certificate is not None:
        reason = refused_certificate.verify_message or str(refused_certificate)
        return KeyBindingError(
            f"{url} did not present the attested TLS certificate ({reason}): whoever answers "
            "is not the server that was attested; nothing was sent (connect() again to "
            "re-attest; if the server runs as several replicas behind one address, each "
            "with its own key, connect(..., replicas=N) attests each of them)"
        )
    if not isinstance(exc, httpx.TransportError | OSError):
        return ProtocolError("bad_answer", f"cannot read the answer of {url}{during}: {exc}")
    unknown_host = _cause(exc, socket.gaierror)
    if unknown_host is not None:
        host = urlsplit(url).hostname or url
        return ConnectionFailedError(
            f"unknown host {host!r} in {url} (check the name: {_reason(unknown_host)})"
        )
    if _cause(exc, ConnectionRefusedError) is not None:
        return ConnectionFailedError(
            f"cannot connect to {url}: connection refused (is the server running, and on "
            "this port?)"
        )
    connecting = isinstance(exc, httpx.ConnectError)
    tls = _cause(exc, ssl.SSLError)
    broken = _cause(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError))
    if connecting and (tls is not None or broken is not None):
        if isinstance(broken, ConnectionResetError):
            what = "the connection was reset"
        elif tls is None or isinstance(tls, ssl.SSLEOFError):
            what = "the server closed the connection"
        elif "WRONG_VERSION_NUMBER" in str(tls):
            what = "the answer is not TLS"
        else:
            what = getattr(tls, "reason", None) or _reason(tls)
        return ConnectionFailedError(
            f"TLS handshake with {url} failed: {what} (is this the server's HTTPS port, not "
            "a plain-HTTP one?)"
        )
    if connecting:
        return ConnectionFailedError(
            f"cannot connect to {url}: {_reason(_cause(exc, OSError) or exc)} (check the "
            "address and the network)"
        )
    if broken is not None:
        what = "connection reset" if isinstance(broken, ConnectionResetError) else _reason(broken)
    elif isinstance(exc, httpx.RemoteProtocolError) and "without sending" in str(exc):
        what = "the server closed it without answering"
    else:
        what = _reason(exc)
    return ConnectionFailedError(
        f"the connection to {url} broke{during}: {what} (did the server stop or restart? "
        "the request may have reached it)"
    )


def _cause(exc: BaseException, kind: type[E] | tuple[type[E], ...]) -> E | None:
    return next((e for e in causes(exc) if isinstance(e, kind)), None)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:].rstrip(".")


def _timeout_phase(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connecting to"
    if isinstance(exc, httpx.WriteTimeout):
        return "sending to"
    if isinstance(exc, httpx.PoolTimeout):
        return "waiting for a free connection to"
    if isinstance(exc, httpx.ReadTimeout):
        return "waiting for the answer of"
    return "talking to"
