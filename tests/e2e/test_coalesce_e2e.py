"""One TLS record per small response and per small request (asgi/coalesce.py and
client/coalesce.py): the head and the body travel together, so the peer wakes once.

Observed through TLS itself: one `recv` on an SSL socket returns the data of one record at
most, so once everything has arrived, a single `recv` holds the whole message only if it
was sent as one record. Without coalescing, the first `recv` holds the head alone.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from blindinfer.client.coalesce import coalescing_transport
from blindinfer.server.process import ServerProcess
from blindinfer.server.tls import make_tls_identity

ARRIVED_S = 0.3
"""Time for bytes already sent on loopback to arrive (only a lower bound matters)."""


def _tls_to(server: ServerProcess) -> ssl.SSLSocket:
    parts = urlsplit(server.url)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # framing only: attestation is tested elsewhere
    raw = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 443))
    return context.wrap_socket(raw)


def test_server_sends_head_and_body_in_one_record(server: ServerProcess) -> None:
    with _tls_to(server) as tls:
        tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        time.sleep(ARRIVED_S)
        first = tls.recv(1 << 16)
    head, _, body = first.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b'{"live":true}'  # the body came in the head's record


@pytest.fixture
def one_record_server() -> Iterator[tuple[str, list[bytes], ssl.SSLContext]]:
    """A TLS server that reads each request with one `recv` once it has arrived."""
    identity = make_tls_identity()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    def serve() -> None:
        raw, _ = listener.accept()
        with identity.ssl_context.wrap_socket(raw, server_side=True) as tls:
            time.sleep(ARRIVED_S)
            seen.append(tls.recv(1 << 16))
            tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            time.sleep(ARRIVED_S)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    yield f"https://127.0.0.1:{port}", seen, client_context
    thread.join(5)
    listener.close()


def test_client_sends_head_and_body_in_one_record(
    one_record_server: tuple[str, list[bytes], ssl.SSLContext],
) -> None:
    url, seen, context = one_record_server
    transport = coalescing_transport(context, [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    with httpx.Client(transport=transport, base_url=url) as http:
        response = http.post("/v2/models/m/infer", content=b"x" * 300)
    assert response.content == b"ok"
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v2/models/m/infer")
    assert body == b"x" * 300  # the body came in the head's record
