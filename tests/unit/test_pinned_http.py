"""The client's fast path (client/pinned_http.py) against a real local TLS server socket.

What is checked: keep-alive reuse (one connection for many requests); head and body in
one TLS record; an idle connection the server closed is dropped, and a reused one it
closes before answering is sent once more on a fresh connection (only once, and never on
a fresh one); a connection closed in the middle of an answer fails as
ConnectionFailedError without a retry; a Content-Length or chunked body over the limit is
ProtocolError("too_large"); a certificate other than the pinned one is a KeyBindingError
before any request byte; connect, read and pool timeouts name their phase; a closed pool
refuses requests; `Client.run_model` takes the path and retries a 503 through
`send_with_retries` on the same connection. And the answer reader, for any split of any
answer into reads (hypothesis), returns exactly the body.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import h11
import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindinfer.client.client import Client
from blindinfer.client.common import Call, request_errors
from blindinfer.client.pinned_http import PinnedConnectionPool, _Connection, _Reader
from blindinfer.client.retry import RetryPolicy
from blindinfer.client.transport import pinned_context
from blindinfer.errors import ConnectionFailedError, KeyBindingError, ProtocolError
from blindinfer.protocol.inference import HEADER_LENGTH, encode_infer_response
from blindinfer.server.tls import TlsIdentity, make_tls_identity

PATH = "/v2/models/m/infer"
CALL = Call("POST", PATH, content=b"request body")


@pytest.fixture(scope="module")
def identity() -> TlsIdentity:
    return make_tls_identity()


def ok(body: bytes, *extra: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in extra)
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n" % (len(body), head) + body


class Peer:
    """The server's side of one accepted TLS connection."""

    def __init__(self, tls: ssl.SSLSocket, server: Server) -> None:
        self.tls = tls
        self.server = server

    def read_request(self) -> bytes | None:
        """The next request's body; None when the client closed the connection."""
        parser = h11.Connection(h11.SERVER)
        body = b""
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = self.tls.recv(65536)
                except (OSError, ssl.SSLError):
                    return None
                if not data and not body:
                    return None
                self.server.received += data
                parser.receive_data(data)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.server.requests.append(body)
                return body
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)


Script = Callable[[Peer, int], None]


class Server:
    """A TLS server on 127.0.0.1 running `script(peer, connection_index)` per connection."""

    def __init__(self, identity: TlsIdentity, script: Script) -> None:
        self.identity = identity
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.handshake_errors: list[BaseException] = []
        self.received = bytearray()
        self.requests: list[bytes] = []
        self.release = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            index = self.connections
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(raw, index), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket, index: int) -> None:
        try:
            tls = self.identity.ssl_context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.handshake_errors.append(exc)
            raw.close()
            return
        with contextlib.suppress(OSError), tls:
            self.script(Peer(tls, self), index)

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(5)


@contextlib.contextmanager
def serving(identity: TlsIdentity, script: Script) -> Iterator[Server]:
    server = Server(identity, script)
    try:
        yield server
    finally:
        server.close()


def pool_for(
    url: str, identity: TlsIdentity, *, timeout: float = 5.0, max_body: int = 1 << 20
) -> PinnedConnectionPool:
    context = pinned_context(identity.certificate_der)
    return PinnedConnectionPool(url, context, timeout=timeout, headers=[], max_body=max_body)


def send(pool: PinnedConnectionPool, url: str, timeout: float = 5.0) -> bytes:
    """As Client._send sends (errors through `request_errors`), without retries."""
    assert CALL.content is not None
    with request_errors(url, timeout, CALL):
        response = pool.request(CALL.method, CALL.path, CALL.headers, CALL.content)
    assert response.status_code == 200
    return response.content


def echo(peer: Peer, index: int) -> None:
    while (body := peer.read_request()) is not None:
        peer.send(ok(b"answer to " + body))


# -- keep-alive --------------------------------------------------------------------------------


def test_one_connection_serves_every_request(identity: TlsIdentity) -> None:
    with serving(identity, echo) as server:
        pool = pool_for(server.url, identity)
        answers = [send(pool, server.url) for _ in range(5)]
        pool.close()
    assert answers == [b"answer to request body"] * 5
    assert server.connections == 1
    assert server.requests == [b"request body"] * 5
    head = bytes(server.received).split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /v2/models/m/infer HTTP/1.1"
    assert head[1] == b"Host: " + server.url.removeprefix("https://").encode()
    assert b"Content-Length: 12" in head


def test_head_and_body_travel_in_one_tls_record(identity: TlsIdentity) -> None:
    """One `recv` on an SSL socket returns one record at most: once everything arrived,
    the first `recv` holds the whole request only if it was sent as one record."""
    first: list[bytes] = []

    def one_recv(peer: Peer, index: int) -> None:
        time.sleep(0.3)  # for bytes already sent on loopback to arrive
        first.append(peer.tls.recv(1 << 16))
        peer.send(ok(b"done"))

    with serving(identity, one_recv) as server:
        pool = pool_for(server.url, identity)
        response = pool.request("POST", PATH, {}, b"x" * 300)
        pool.close()
    assert response.content == b"done"
    assert first[0].endswith(b"\r\n\r\n" + b"x" * 300)


def test_a_connection_the_server_closed_while_idle_is_not_used(identity: TlsIdentity) -> None:
    closed = threading.Event()

    def answer_once(peer: Peer, index: int) -> None:
        if peer.read_request() is not None:
            peer.send(ok(b"answer %d" % index))
        peer.tls.close()
        closed.set()

    with serving(identity, answer_once) as server:
        pool = pool_for(server.url, identity)
        assert send(pool, server.url) == b"answer 0"
        assert closed.wait(5)
        assert send(pool, server.url) == b"answer 1"
        pool.close()
    assert server.connections == 2
    assert server.requests == [b"request body"] * 2


def test_a_reused_connection_closed_before_answering_is_retried_once(
    identity: TlsIdentity,
) -> None:
    def drop_second(peer: Peer, index: int) -> None:
        if index == 0:
            peer.read_request()
            peer.send(ok(b"first"))
            peer.read_request()  # the keep-alive race: closed as the request arrives
            return
        echo(peer, index)

    with serving(identity, drop_second) as server:
        pool = pool_for(server.url, identity)
        assert send(pool, server.url) == b"first"
        assert send(pool, server.url) == b"answer to request body"
        pool.close()
    assert server.connections == 2


def test_the_retry_is_sent_once_and_a_fresh_connection_is_never_retried(
    identity: TlsIdentity,
) -> None:
    def drop_all_but_first(peer: Peer, index: int) -> None:
        peer.read_request()
        if index == 0:
            peer.send(ok(b"first"))
            peer.read_request()

    with serving(identity, drop_all_but_first) as server:
        pool = pool_for(server.url, identity)
        assert send(pool, server.url) == b"first"
        with pytest.raises(ConnectionFailedError) as failed:
            send(pool, server.url)
        pool.close()
    assert server.connections == 2  # the first one, and one retry
    assert str(failed.value) == (
        f"the connection to {server.url} broke during POST {PATH}: the server closed it "
        "without answering (did the server stop or restart? the request may have reached it)"
    )


# -- broken answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("reused", [False, True])
def test_a_connection_closed_mid_answer_fails_without_retry(
    identity: TlsIdentity, reused: bool
) -> None:
    def cut(peer: Peer, index: int) -> None:
        if reused:
            peer.read_request()
            peer.send(ok(b"first"))
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)

    with serving(identity, cut) as server:
        pool = pool_for(server.url, identity)
        if reused:
            send(pool, server.url)
        with pytest.raises(ConnectionFailedError) as failed:
            send(pool, server.url)
        pool.close()
    assert server.connections == 1
    # worded by transport.connection_failed exactly as for httpx, whose exception it is
    assert str(failed.value).startswith(f"the connection to {server.url} broke during POST")
    cause = failed.value.__cause__
    assert isinstance(cause, httpx.RemoteProtocolError)
    assert str(cause) == (
        "peer closed connection without sending complete message body "
        "(received 10 bytes, expected 100)"
    )


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"x" * 5000,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"".join(b"200\r\n" + b"x" * 512 + b"\r\n" for _ in range(4))
        + b"0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_an_answer_over_the_limit_is_refused(identity: TlsIdentity, answer: bytes) -> None:
    def large(peer: Peer, index: int) -> None:
        peer.read_request()
        peer.send(answer)
        peer.server.release.wait(5)

    with serving(identity, large) as server:
        pool = pool_for(server.url, identity, max_body=1000)
        with pytest.raises(ProtocolError) as refused:
            send(pool, server.url)
        pool.close()
    assert refused.value.code == "too_large"
    size = 5000 if b"5000" in answer else 1024
    assert refused.value.message == (
        f"the server's answer ({size} bytes) is larger than the client's limit of 1000 bytes"
    )


def test_another_certificate_is_refused_before_a_request_byte(identity: TlsIdentity) -> None:
    impostor = make_tls_identity()
    with serving(impostor, echo) as server:
        pool = pool_for(server.url, identity)
        with pytest.raises(KeyBindingError) as refused:
            send(pool, server.url)
        pool.close()
        server.close()
    assert str(refused.value).startswith(
        f"{server.url} did not present the attested TLS certificate ("
    )
    assert server.received == b""
    assert server.requests == []
    assert len(server.handshake_errors) == 1


# -- timeouts ----------------------------------------------------------------------------------


def test_a_slow_answer_times_out(identity: TlsIdentity) -> None:
    def silent(peer: Peer, index: int) -> None:
        peer.read_request()
        peer.server.release.wait(10)

    with serving(identity, silent) as server:
        pool = pool_for(server.url, identity, timeout=0.3)
        with pytest.raises(ConnectionFailedError) as failed:
            send(pool, server.url, timeout=0.3)
        pool.close()
    assert str(failed.value) == (
        f"timed out after 0.3 s waiting for the answer of {server.url} during POST {PATH} "
        "(is the server up and not overloaded? a larger timeout= waits longer)"
    )


def test_waiting_for_a_free_connection_times_out(identity: TlsIdentity) -> None:
    with serving(identity, echo) as server:
        context = pinned_context(identity.certificate_der)
        pool = PinnedConnectionPool(
            server.url, context, timeout=0.3, headers=[], max_body=1000, max_connections=1
        )
        assert pool._slots.acquire(timeout=1)  # the one connection is busy
        with pytest.raises(ConnectionFailedError) as failed:
            send(pool, server.url, timeout=0.3)
        pool._slots.release()
        assert send(pool, server.url) == b"answer to request body"
        pool.close()
    assert server.connections == 1
    assert str(failed.value) == (
        f"timed out after 0.3 s waiting for a free connection to {server.url} during POST "
        f"{PATH} (is the server up and not overloaded? a larger timeout= waits longer)"
    )


def test_a_handshake_that_never_comes_times_out_connecting(identity: TlsIdentity) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    try:
        pool = pool_for(url, identity, timeout=0.3)
        with pytest.raises(ConnectionFailedError) as failed:
            send(pool, url, timeout=0.3)
        pool.close()
    finally:
        listener.close()
    assert str(failed.value) == (
        f"timed out after 0.3 s connecting to {url} "
        "(is the server up and not overloaded? a larger timeout= waits longer)"
    )


def test_a_closed_pool_refuses_requests(identity: TlsIdentity) -> None:
    with serving(identity, echo) as server:
        pool = pool_for(server.url, identity)
        pool.close()
        with pytest.raises(RuntimeError, match="client has been closed"):
            send(pool, server.url)
    assert server.connections == 0


# -- through the Client ------------------------------------------------------------------------


def test_run_model_takes_the_fast_path_and_retries_a_503(identity: TlsIdentity) -> None:
    outputs = {"y": np.arange(6, dtype=np.float32).reshape(2, 3)}
    body, headers = encode_infer_response("m", None, None, outputs, binary={"y"})
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s: %s\r\n\r\n"
        % (len(body), HEADER_LENGTH.encode(), headers[HEADER_LENGTH].encode())
        + body
    )
    refusal = b'{"code": "overloaded", "error": "the queue is full"}'

    def busy_then_answer(peer: Peer, index: int) -> None:
        peer.read_request()
        peer.send(
            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 0\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(refusal) + refusal
        )
        peer.read_request()
        peer.send(answer)
        peer.server.release.wait(5)

    attestation: Any = SimpleNamespace(certificate_der=identity.certificate_der)
    with serving(identity, busy_then_answer) as server:
        retry = RetryPolicy(backoff=0, jitter=0)
        with Client(server.url, attestation, timeout=5, api_key="k", retry=retry) as client:
            got = client.run_model("m", {"x": np.ones((1, 2), dtype=np.float32)})
    np.testing.assert_array_equal(got["y"], outputs["y"])
    assert server.connections == 1
    assert len(server.requests) == 2
    assert b"\r\nauthorization: Bearer k\r\n" in bytes(server.received)
    assert b"accept-encoding" not in bytes(server.received).lower()


# -- the answer reader, for any split into reads -----------------------------------------------


class FakeSocket:
    """Hands out `data` in reads of the given sizes (then whatever is left)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = data
        self.sizes = sizes
        self.at = 0

    def recv_into(self, view: memoryview) -> int:
        size = self.sizes.pop(0) if self.sizes else len(self.data)
        chunk = self.data[self.at : self.at + min(size, len(view))]
        view[: len(chunk)] = chunk
        self.at += len(chunk)
        return len(chunk)

    def pending(self) -> int:
        return 0


def read_answer(data: bytes, sizes: list[int], max_body: int = 1 << 20) -> Any:
    exchange = h11.Connection(h11.CLIENT)
    exchange.send(h11.Request(method="POST", target="/", headers=[("Host", "h")]))
    connection: Any = _Connection(FakeSocket(data, sizes))  # type: ignore[arg-type]
    return _Reader(connection, exchange, max_body, "POST", None).answer()


def chunked(body: bytes, cuts: list[int]) -> bytes:
    pieces, at = [], 0
    for cut in [*sorted(c % (len(body) + 1) for c in cuts), len(body)]:
        if cut > at:
            pieces.append(b"%x\r\n%s\r\n" % (cut - at, body[at:cut]))
            at = cut
    return b"".join(pieces) + b"0\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 700), max_size=40),
    cuts=st.lists(st.integers(0, 3000), max_size=8),
    framing=st.sampled_from(["length", "chunked", "close"]),
)
def test_any_split_of_an_answer_reads_exactly_its_body(
    body: bytes, sizes: list[int], cuts: list[int], framing: str
) -> None:
    if framing == "length":
        data = ok(body, b"x-extra: 1")
    elif framing == "chunked":
        data = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(body, cuts)
    else:
        data = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + body
    answer = read_answer(data, sizes)
    assert answer.status == 200
    assert answer.body == body
    assert answer.reusable is (framing != "close")


@settings(deadline=None)
@given(extra=st.binary(min_size=1, max_size=50))
def test_bytes_after_the_answer_make_the_connection_unusable(extra: bytes) -> None:
    answer = read_answer(ok(b"body") + extra, [])
    assert answer.body == b"body"
    assert answer.reusable is False


def test_a_head_longer_than_h11_allows_is_refused() -> None:
    data = b"HTTP/1.1 200 OK\r\nx-long: " + b"a" * 40000 + b"\r\ncontent-length: 0\r\n\r\n"
    with pytest.raises(httpx.RemoteProtocolError, match=r"^Receive buffer too long$"):
        read_answer(data, [4096] * 10)  # h11 bounds a head it has not seen the end of
