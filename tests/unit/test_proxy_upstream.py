"""The proxy's own forwarder (proxy/upstream.py + AttestingProxy's forwarding) against a
scripted TLS upstream in this process: what the upstream receives, what the local client
gets, the bounds, the stale-connection retry and the pin check on new connections.

The app is driven as uvicorn drives it (ASGI scope, receive, send); attestation is
replaced by a stub that "verifies" whichever certificate the test names, so that the pin
(the TLS handshake against exactly that certificate) is what is under test. The real
attestation path is covered end to end in tests/e2e/test_proxy_e2e.py.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import blindinfer
from blindinfer.proxy import upstream as wire
from blindinfer.proxy.forward import (
    DROPPED_REQUEST,
    HOP_BY_HOP,
    AttestingProxy,
    ProxyConfig,
    _PinChanged,
)

POLICY = blindinfer.Policy(
    sgx=blindinfer.SgxPolicy(mrenclave=(b"\x01" * 32,), mrsigner=(b"\x02" * 32,))
)
API_KEY = "bik_the-proxys-own-key"


# -- a TLS upstream scripted per request ------------------------------------------------------


@dataclass
class Identity:
    der: bytes
    context: ssl.SSLContext


def identity(directory: Path, name: str) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return Identity(certificate.public_bytes(serialization.Encoding.DER), context)


@dataclass
class Seen:
    """One request as the upstream received it."""

    connection: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


# respond(request, index of the request on its connection) -> raw response bytes, or None
# to close the connection without answering
Respond = Callable[[Seen, int], bytes | None]


def ok(body: bytes = b'{"ok": true}', *extra: str) -> bytes:
    head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    head += "".join(f"{line}\r\n" for line in extra)
    return head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body


@dataclass
class Upstream:
    identity: Identity
    respond: Respond
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None
    address: str = ""
    _handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    async def start(self) -> str:
        self.server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=self.identity.context
        )
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return f"https://{self.address}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        self.connections += 1
        number = self.connections
        pending = b""
        try:
            for index in range(100):
                parser = h11.Connection(h11.SERVER)
                if pending:  # (b"" would mean the end of the connection)
                    parser.receive_data(pending)
                request: h11.Request | None = None
                body = b""
                while True:
                    event = parser.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        if not data:
                            return
                        parser.receive_data(data)
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                pending = parser.trailing_data[0]
                assert request is not None
                seen = Seen(
                    number, request.method, request.target, list(request.headers.raw_items()), body
                )
                self.seen.append(seen)
                answer = self.respond(seen, index)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            writer.close()
            self._handlers.pop(task, None)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._handlers.values():
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self.server.wait_closed()


@dataclass
class Stub:
    """What `capture` + `verify_bundle` would return: the fields the proxy reads."""

    certificate_der: bytes
    kind: str = "sgx"
    simulation: bool = True

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind}


# -- driving the ASGI app ---------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    messages: list[dict[str, Any]]

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: AttestingProxy,
    method: str,
    path: str,
    *,
    body: list[bytes] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Answer:
    raw = [(b"host", b"127.0.0.1:8000"), *(headers or [])]
    if body is not None and len(body) == 1:
        raw.append((b"content-length", str(len(body[0])).encode()))
    elif body is not None:
        raw.append((b"transfer-encoding", b"chunked"))
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": raw,
        "server": ("127.0.0.1", 8000),
        "http_version": "1.1",
        "scheme": "http",
    }
    parts = list(body or [b""])
    messages = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    return Answer(
        start["status"],
        dict(start["headers"]),
        b"".join(m.get("body", b"") for m in sent[1:]),
        sent,
    )


def proxy(url: str, stubs: list[Stub], **overrides: Any) -> AttestingProxy:
    """An AttestingProxy whose attestations return `stubs` in turn (the last one repeats)."""
    options: dict[str, Any] = {
        "upstream": url,
        "policy": POLICY,
        "simulation": True,
        "api_key": API_KEY,
        "fresh_seconds": 60.0,
        "retry_seconds": 0.0,
        "timeout": 10.0,
        **overrides,
    }
    app = AttestingProxy(ProxyConfig(**options))
    queue = list(stubs)

    def attest() -> Stub:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    app.upstream._attest_blocking = attest  # type: ignore[assignment, method-assign]
    return app


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> tuple[Identity, Identity]:
    directory = tmp_path_factory.mktemp("ids")
    return identity(directory, "attested"), identity(directory, "other")


# -- what crosses, each way -------------------------------------------------------------------


def test_request_and_response_headers_are_filtered(ids: tuple[Identity, Identity]) -> None:
    def respond(seen: Seen, index: int) -> bytes:
        return ok(
            b"{}",
            "connection: x-upstream-private",
            "x-upstream-private: 1",
            "keep-alive: timeout=5",
            "access-control-allow-origin: *",
            "x-kept: yes",
        )

    async def test() -> None:
        upstream = Upstream(ids[0], respond)
        app = proxy(await upstream.start(), [Stub(ids[0].der)])
        try:
            answer = await call(
                app,
                "POST",
                "/v2/models/m/infer",
                body=[b'{"inputs": []}'],
                headers=[
                    (b"content-type", b"application/json"),
                    (b"connection", b"keep-alive, x-private"),
                    (b"x-private", b"secret"),
                    (b"keep-alive", b"5"),
                    (b"te", b"trailers"),
                    (b"upgrade", b"h2c"),
                    (b"proxy-authorization", b"Basic x"),
                    (b"authorization", b"Bearer bik_forged"),
                    (b"x-blindinfer-proxy-token", b"t" * 40),
                    (b"x-kept", b"1"),
                ],
            )
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert answer.status == 200
        assert answer.body == b"{}"
        assert answer.headers == {
            b"content-type": b"application/json",
            b"x-kept": b"yes",
            b"content-length": b"2",
        }
        (seen,) = upstream.seen
        assert (seen.method, seen.target, seen.body) == (
            b"POST",
            b"/v2/models/m/infer",
            b'{"inputs": []}',
        )
        assert dict((k.lower(), v) for k, v in seen.headers) == {
            b"host": upstream.address.encode(),
            b"content-type": b"application/json",
            b"x-kept": b"1",
            b"content-length": b"14",
            b"authorization": f"Bearer {API_KEY}".encode(),
        }
        assert app.upstream.stats.forwarded == 1

    run(test)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [*HOP_BY_HOP, *DROPPED_REQUEST, b"x-a", b"x-b", b"accept", b"content-type"]
            ),
            st.binary(min_size=0, max_size=8).filter(lambda v: b"\r" not in v and b"\n" not in v),
        ),
        max_size=12,
    ),
    st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_no_hop_by_hop_or_caller_credentials_go_upstream(
    headers: list[tuple[bytes, bytes]], forward_authorization: bool
) -> None:
    app = AttestingProxy(
        ProxyConfig(
            upstream="https://127.0.0.1:9",
            policy=POLICY,
            api_key=API_KEY,
            forward_client_authorization=forward_authorization,
        )
    )
    named = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    out, _length, error = app._request_headers({"headers": headers})
    if error is not None:
        assert error[0] == 400
        assert error[1]["code"] == "invalid_request"
        return
    names = [name for name, _ in out]
    assert names[0] == b"host"
    assert names.count(b"host") == 1
    assert out[0] == (b"host", b"127.0.0.1:9")
    for name in names[1:]:
        assert name not in HOP_BY_HOP
        assert name not in named
        assert name not in (DROPPED_REQUEST - {b"authorization"})
    sent_authorization = [value for name, value in out if name == b"authorization"]
    callers = [value for name, value in headers if name == b"authorization"]
    if forward_authorization and callers:
        assert sent_authorization == [callers[-1]]
    else:
        assert sent_authorization == [f"Bearer {API_KEY}".encode()]


# -- bounds -----------------------------------------------------------------------------------


def test_a_declared_response_over_the_limit_is_502_unread(ids: tuple[Identity, Identity]) -> None:
    async def test() -> None:
        upstream = Upstream(ids[0], lambda seen, index: ok(b"x" * 5000))
        app = proxy(await upstream.start(), [Stub(ids[0].der)], max_response_bytes=4096)
        try:
            answer = await call(app, "GET", "/v2/models/m")
            openai = await call(app, "GET", "/v1/models")
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert answer.status == 502
        assert answer.json() == {
            "error": "the upstream's response is larger than 4096 bytes",
            "code": "bad_gateway",
        }
        assert openai.status == 502
        assert openai.json()["error"]["code"] == "bad_gateway"
        assert openai.json()["error"]["type"]
        assert upstream.connections == 2  # the unread body: that connection was not reused

    run(test)


def chunked_response(seen: Seen, index: int) -> bytes:
    chunk = b"y" * 3000
    return (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3
        + b"0\r\n\r\n"
    )


def test_a_streamed_response_over_the_limit_cuts_the_connection(
    ids: tuple[Identity, Identity],
) -> None:
    """No length declared: the head is out before the body passes the limit, so the local
    connection is cut (uvicorn closes it when the app raises)."""

    async def test() -> None:
        upstream = Upstream(ids[0], chunked_response)
        app = proxy(await upstream.start(), [Stub(ids[0].der)], max_response_bytes=4096)
        try:
            await call(app, "GET", "/v2/models/m")
        finally:
            await app.upstream.aclose()
            await upstream.close()

    with pytest.raises(ConnectionAbortedError, match="larger than 4096"):
        run(test)


def test_a_streamed_response_is_relayed_part_by_part(ids: tuple[Identity, Identity]) -> None:
    async def test() -> None:
        upstream = Upstream(ids[0], chunked_response)
        app = proxy(await upstream.start(), [Stub(ids[0].der)], max_response_bytes=9000)
        try:
            answer = await call(app, "GET", "/v2/models/m")
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert answer.status == 200
        assert answer.body == b"y" * 9000
        assert b"transfer-encoding" not in answer.headers  # the local server frames it again
        assert all(m["more_body"] for m in answer.messages[1:-1])
        assert answer.messages[-1] == {
            "type": "http.response.body",
            "body": b"",
            "more_body": False,
        }

    run(test)


def test_a_response_head_over_the_limit_is_502(ids: tuple[Identity, Identity]) -> None:
    huge = b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"a" * wire.MAX_HEAD_BYTES + b"\r\n\r\n"

    async def test() -> None:
        upstream = Upstream(ids[0], lambda seen, index: huge)
        app = proxy(await upstream.start(), [Stub(ids[0].der)])
        try:
            answer = await call(app, "GET", "/v2/models/m")
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert answer.status == 502
        assert answer.json()["code"] == "upstream_error"

    run(test)


def test_an_upstream_that_does_not_answer_times_out_as_502(
    ids: tuple[Identity, Identity],
) -> None:
    async def test() -> None:
        upstream = Upstream(ids[0], lambda seen, index: b"")  # reads, keeps it open, silent
        app = proxy(await upstream.start(), [Stub(ids[0].der)], timeout=0.3)
        try:
            answer = await call(app, "GET", "/v2")
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert answer.status == 502
        assert answer.json()["code"] == "upstream_error"
        assert "did not answer in time" in answer.json()["error"]

    run(test)


def test_request_body_limit_declared_and_streamed(ids: tuple[Identity, Identity]) -> None:
    async def test() -> None:
        upstream = Upstream(ids[0], lambda seen, index: ok())
        app = proxy(await upstream.start(), [Stub(ids[0].der)], max_request_bytes=1000)
        try:
            declared = await call(app, "PUT", "/v2/repository/models/m/upload", body=[b"x" * 1001])
            streamed = await call(
                app, "PUT", "/v2/repository/models/m/upload", body=[b"x" * 600, b"y" * 600]
            )
            openai = await call(app, "POST", "/v1/chat/completions", body=[b"x" * 1001])
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert declared.status == streamed.status == openai.status == 413
        assert declared.json()["code"] == streamed.json()["code"] == "payload_too_large"
        assert openai.json()["error"]["code"] == "payload_too_large"
        assert app.upstream.stats.forwarded == 0
        assert upstream.seen == []  # the streamed one's head and first part left, no request

    run(test)


# -- connections: reuse, stale ones, the pin ----------------------------------------------------


def test_keep_alive_reuses_one_connection(ids: tuple[Identity, Identity]) -> None:
    async def test() -> None:
        upstream = Upstream(ids[0], lambda seen, index: ok())
        app = proxy(await upstream.start(), [Stub(ids[0].der)])
        try:
            for _ in range(3):
                assert (await call(app, "GET", "/v2")).status == 200
            streamed = await call(
                app, "PUT", "/v2/repository/models/m/upload", body=[b"a" * 10, b"b" * 10]
            )
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert streamed.status == 200
        assert upstream.seen[-1].body == b"a" * 10 + b"b" * 10
        assert upstream.connections == 1
        assert app.upstream.stats.new_connections == 1

    run(test)


def test_a_head_request_answer_has_a_length_and_no_body(ids: tuple[Identity, Identity]) -> None:
    """h11 knows HEAD's answer has no body whatever its Content-Length: the connection
    stays usable for the next request."""

    def respond(seen: Seen, index: int) -> bytes:
        if seen.method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
        return ok()

    async def test() -> None:
        upstream = Upstream(ids[0], respond)
        app = proxy(await upstream.start(), [Stub(ids[0].der)])
        try:
            head = await call(app, "HEAD", "/v2")
            after = await call(app, "GET", "/v2")
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert (head.status, head.body, head.headers[b"content-length"]) == (200, b"", b"1234")
        assert (after.status, after.body) == (200, b'{"ok": true}')
        assert upstream.connections == 1

    run(test)


def test_a_stale_reused_connection_is_retried_once_on_a_new_one(
    ids: tuple[Identity, Identity],
) -> None:
    """The server closes the kept-alive connection when the next request arrives, before
    any byte of an answer: the request goes again on a new (checked) connection."""

    async def test() -> None:
        upstream = Upstream(ids[0], lambda seen, index: ok() if index == 0 else None)
        app = proxy(await upstream.start(), [Stub(ids[0].der)])
        try:
            first = await call(app, "GET", "/v2")
            again = await call(app, "POST", "/v2/models/m/infer", body=[b'{"inputs": []}'])
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert first.status == again.status == 200
        assert [s.connection for s in upstream.seen] == [1, 1, 2]  # read, closed; again
        assert upstream.seen[1].body == upstream.seen[2].body == b'{"inputs": []}'
        assert app.upstream.stats.new_connections == 2
        assert app.upstream.stats.forwarded == 2

    run(test)


def test_no_retry_for_a_streamed_body_or_a_new_connection(ids: tuple[Identity, Identity]) -> None:
    def respond(seen: Seen, index: int) -> bytes | None:
        return ok() if (seen.connection, index) == (1, 0) else None

    async def test() -> None:
        upstream = Upstream(ids[0], respond)
        app = proxy(await upstream.start(), [Stub(ids[0].der)])
        try:
            assert (await call(app, "GET", "/v2")).status == 200
            # a streamed body cannot be sent again: 502
            streamed = await call(
                app, "PUT", "/v2/repository/models/m/upload", body=[b"a" * 10, b"b" * 10]
            )
            # a new connection that closes without answering: not stale, not retried
            fresh = await call(app, "POST", "/v2/models/m/infer", body=[b"{}"])
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert streamed.status == fresh.status == 502
        assert streamed.json()["code"] == fresh.json()["code"] == "upstream_error"
        assert [s.connection for s in upstream.seen] == [1, 1, 2]

    run(test)


def test_another_certificate_on_a_new_connection_attests_again(
    ids: tuple[Identity, Identity],
) -> None:
    """The upstream restarted with a new key: the handshake fails against the pin, the proxy
    attests again (here: the new key verifies) and forwards on a connection pinned to it."""
    attested, other = ids

    async def test() -> None:
        upstream = Upstream(other, lambda seen, index: ok())
        app = proxy(await upstream.start(), [Stub(attested.der), Stub(other.der)])
        try:
            await app.upstream.attest("startup")
            answer = await call(app, "GET", "/v2")
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert answer.status == 200
        stats = app.upstream.stats
        assert (stats.attestations, stats.certificate_changes, stats.forwarded) == (2, 1, 1)
        assert app.upstream.attestation is not None
        assert app.upstream.attestation.certificate_der == other.der
        # the refused handshake never reached the handler: one connection, on the new pin
        assert [s.connection for s in upstream.seen] == [1]

    run(test)


def test_another_certificate_that_stays_is_refused(ids: tuple[Identity, Identity]) -> None:
    """Attesting again still names the old key (the answerer is not the attested server):
    nothing is forwarded; the refusal carries the reason, per path in its API's shape."""
    attested, other = ids

    async def test() -> None:
        upstream = Upstream(other, lambda seen, index: ok())
        app = proxy(await upstream.start(), [Stub(attested.der)])
        try:
            await app.upstream.attest("startup")
            answer = await call(app, "GET", "/v2")
            openai = await call(app, "POST", "/v1/chat/completions", body=[b"{}"])
        finally:
            await app.upstream.aclose()
            await upstream.close()
        assert answer.status == 503
        assert answer.json()["code"] == "upstream_unavailable"
        assert "certificate" in answer.json()["message"].lower()
        assert openai.status == 503
        error = openai.json()["error"]
        assert error["code"] == "upstream_unavailable"
        assert error["attestation_error"] == answer.json()["attestation_error"]
        assert upstream.seen == []
        assert app.upstream.stats.forwarded == 0

    run(test)


def test_check_connection_refuses_another_key_and_attests_a_stale_reconnect(
    ids: tuple[Identity, Identity],
) -> None:
    attested, other = ids

    async def test() -> None:
        app = proxy("https://127.0.0.1:9", [Stub(attested.der)], fresh_seconds=0.0)
        await app.upstream.attest("startup")
        with pytest.raises(_PinChanged):
            await app.upstream.check_connection(other.der)
        with pytest.raises(_PinChanged):
            await app.upstream.check_connection(None)
        assert app.upstream.stats.attestations == 1
        await app.upstream.check_connection(attested.der)  # older than fresh_seconds = 0
        assert app.upstream.stats.attestations == 2
        await app.upstream.aclose()

    run(test)


def test_closing_the_pool_aborts_its_connections(ids: tuple[Identity, Identity]) -> None:
    async def test() -> None:
        upstream = Upstream(ids[0], lambda seen, index: ok())
        app = proxy(await upstream.start(), [Stub(ids[0].der)])
        try:
            assert (await call(app, "GET", "/v2")).status == 200
            pool = await app.upstream.client()
            await app.upstream.aclose()
            with pytest.raises(ConnectionAbortedError):
                await pool.acquire()
        finally:
            await upstream.close()

    run(test)
