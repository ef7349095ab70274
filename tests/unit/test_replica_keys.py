"""The replica-set key check (client/replica_gate.py) against real local TLS servers.

Each server has its own TLS key and answers the attestation routes with real simulation
evidence (or, for the impostor, evidence that binds ANOTHER key). What is checked, on the
bytes each server received:
- a connection to an unknown key carries POST /v2/attestation then GET /v2/attestation
  before the request, and a later connection to the same key carries the request only;
- evidence that does not bind the presented key: AttestationError (KeyBindingError), the
  connection closed, zero request bytes received;
- the bounds: max_keys forgets the oldest key, max_age makes a key attested again;
- the same check in each transport: the fast path's sockets, httpx sync and async pools,
  the openai SDK's httpx2 pools; httpx answers carry the AttestedKey of their connection;
- which broken requests are sent again (`broken_retryable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import httpx
import pytest

from blindinfer.client.attested_keys import AttestedKeys
from blindinfer.client.client import replica_verifier
from blindinfer.client.coalesce import coalescing_transport
from blindinfer.client.common import INDEX_CALL, Call, broken_retryable, infer_call
from blindinfer.client.connection_evidence import BootEvidenceExchange
from blindinfer.client.pinned_http import PinnedConnectionPool
from blindinfer.client.replica_gate import (
    ATTESTED_KEY,
    KeyGate,
    attest_first,
    attested_key_of,
    gated_async_transport,
    gated_context,
    gated_httpx2_transport,
)
from blindinfer.client.transport import NO_DELAY
from blindinfer.errors import ConnectionFailedError, KeyBindingError
from blindinfer.protocol.evidence import (
    NONCE_SIZE,
    EvidenceDocument,
    encode_evidence_document,
    parse_nonce_request,
)
from blindinfer.server.tls import TlsIdentity, make_tls_identity
from blindinfer.tee.simulation.platform import SimulationPlatform

PLATFORM = SimulationPlatform(bytes(32))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Replica:
    """A TLS server with its own key; `binds`: the identity its evidence names."""

    identity: TlsIdentity
    binds: TlsIdentity
    port: int = 0
    after_evidence: bytes = b""
    """Sent right after the fresh evidence's answer (bytes no request asked for)."""
    connections: list[list[str]] = field(default_factory=list)
    request_bytes: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def evidence(self, nonce: bytes) -> bytes:
        made = PLATFORM.evidence(self.binds.spki_sha256 + nonce)
        return encode_evidence_document(
            EvidenceDocument(
                kind=made.kind,
                platform=PLATFORM.kind,
                nonce=nonce,
                quote=made.quote,
                collateral_json=made.collateral_json,
                certificate_der=self.binds.certificate_der,
                chip_certificates=made.certificates,
                crl=made.crl,
            )
        )

    def serve(self, raw: socket.socket) -> None:
        seen: list[str] = []
        with self.lock:
            self.connections.append(seen)
            self.request_bytes.append(0)
            index = len(self.request_bytes) - 1
        try:
            sock = self.identity.ssl_context.wrap_socket(raw, server_side=True)
        except OSError:
            return
        with contextlib.closing(sock):
            conn = h11.Connection(h11.SERVER)
            while True:
                request, body = _read_request(conn, sock)
                if request is None:
                    return
                target = request.target.decode()
                extra = b""
                seen.append(f"{request.method.decode()} {target}")
                if target == "/v2/attestation":
                    nonce = (
                        parse_nonce_request(body)
                        if request.method == b"POST"
                        else bytes(NONCE_SIZE)
                    )
                    answer = self.evidence(nonce)
                    if request.method == b"POST":
                        extra = self.after_evidence
                else:
                    with self.lock:
                        self.request_bytes[index] += len(body) + len(target)
                    answer = self.identity.certificate_der[-8:].hex().encode()
                head = h11.Response(status_code=200, headers=[("content-length", str(len(answer)))])
                sock.sendall(
                    (conn.send(head) or b"")
                    + (conn.send(h11.Data(data=answer)) or b"")
                    + (conn.send(h11.EndOfMessage()) or b"")
                    + extra
                )
                conn.start_next_cycle()


def _read_request(conn: h11.Connection, sock: ssl.SSLSocket) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except OSError:
                return None, b""
            conn.receive_data(data)
            if not data:
                return None, b""
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        else:
            return None, b""


@contextlib.contextmanager
def running(replica: Replica) -> Iterator[Replica]:
    listener = socket.create_server(("127.0.0.1", 0))
    replica.port = listener.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=replica.serve, args=(raw,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield replica
    finally:
        stop.set()
        listener.close()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    identities = [make_tls_identity() for _ in range(3)]
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running(Replica(i, i))) for i in identities]


@pytest.fixture
def impostor() -> Iterator[Replica]:
    with running(Replica(make_tls_identity(), make_tls_identity())) as replica:
        yield replica


def gate_for(url: str, keys: AttestedKeys) -> KeyGate:
    return KeyGate(url, keys, replica_verifier(None, True, None))


def pool(url: str, gate: KeyGate) -> PinnedConnectionPool:
    return PinnedConnectionPool(
        url, gated_context(), timeout=5.0, headers=[], max_body=1 << 20, gate=gate
    )


ATTEST = ["POST /v2/attestation", "GET /v2/attestation"]


def test_an_unknown_key_is_attested_on_its_connection_before_the_request(
    replicas: list[Replica],
) -> None:
    a = replicas[0]
    gate = gate_for(a.url, AttestedKeys(max_keys=3))
    with contextlib.closing(pool(a.url, gate)) as first:
        answer = first.request("POST", "/run", {}, b"x")
    assert a.connections == [[*ATTEST, "POST /run"]]
    key = answer.extensions[ATTESTED_KEY]
    assert key.certificate_der == a.identity.certificate_der
    assert key.boot_evidence is not None
    assert [k.certificate_der for k in gate.keys.admitted()] == [a.identity.certificate_der]
    with contextlib.closing(pool(a.url, gate)) as second:  # a new connection, known key
        second.request("POST", "/run", {}, b"x")
    assert a.connections[1] == ["POST /run"]


def test_evidence_that_binds_another_key_is_refused_before_any_request_byte(
    impostor: Replica,
) -> None:
    gate = gate_for(impostor.url, AttestedKeys(max_keys=3))
    with contextlib.closing(pool(impostor.url, gate)) as refused, pytest.raises(KeyBindingError):
        refused.request("POST", "/run", {}, b"secret input")
    assert impostor.connections == [ATTEST]
    assert impostor.request_bytes == [0]
    assert len(gate.keys) == 0
    with pytest.raises(KeyBindingError):
        attest_first(gate, 5.0)  # connect(replicas=N) refuses it the same way


def test_max_keys_forgets_the_oldest_key_which_is_then_attested_again(
    replicas: list[Replica],
) -> None:
    clock = Clock()
    gate = gate_for(replicas[0].url, AttestedKeys(max_keys=2, clock=clock))
    for replica in [*replicas, replicas[0]]:
        clock.now += 1
        with contextlib.closing(pool(replica.url, gate)) as one:
            one.request("POST", "/run", {}, b"x")
    assert len(gate.keys) == 2
    assert replicas[0].connections == [[*ATTEST, "POST /run"], [*ATTEST, "POST /run"]]
    held = {k.certificate_der for k in gate.keys.admitted()}
    assert held == {replicas[2].identity.certificate_der, replicas[0].identity.certificate_der}


def test_an_attestation_older_than_max_age_is_made_again(replicas: list[Replica]) -> None:
    clock = Clock()
    a = replicas[0]
    gate = gate_for(a.url, AttestedKeys(max_keys=3, max_age_seconds=60, clock=clock))
    for advance in (0, 30, 31):
        clock.now += advance
        with contextlib.closing(pool(a.url, gate)) as one:
            one.request("POST", "/run", {}, b"x")
    assert a.connections == [[*ATTEST, "POST /run"], ["POST /run"], [*ATTEST, "POST /run"]]


def test_httpx_sync_pool_checks_each_new_connection(
    replicas: list[Replica], impostor: Replica
) -> None:
    gate = gate_for(replicas[0].url, AttestedKeys(max_keys=3))
    for replica in replicas[:2]:
        transport = coalescing_transport(gated_context(), NO_DELAY, gate=gate)
        with httpx.Client(transport=transport, base_url=replica.url) as http:
            response = http.post("/run", content=b"x")
            assert attested_key_of(response) is not None
            assert attested_key_of(response).certificate_der == replica.identity.certificate_der  # type: ignore[union-attr]
        assert replica.connections == [[*ATTEST, "POST /run"]]
    transport = coalescing_transport(gated_context(), NO_DELAY, gate=gate)
    with (
        httpx.Client(transport=transport, base_url=impostor.url) as http,
        pytest.raises(KeyBindingError),
    ):
        http.post("/run", content=b"secret")
    assert impostor.request_bytes == [0]


def test_httpx_async_pool_checks_each_new_connection(
    replicas: list[Replica], impostor: Replica
) -> None:
    gate = gate_for(replicas[0].url, AttestedKeys(max_keys=3))
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)

    async def run(url: str) -> httpx.Response:
        transport = gated_async_transport(gate, NO_DELAY, limits)
        async with httpx.AsyncClient(transport=transport, base_url=url) as http:
            return await http.post("/run", content=b"x")

    response = asyncio.run(run(replicas[1].url))
    assert attested_key_of(response).certificate_der == replicas[1].identity.certificate_der  # type: ignore[union-attr]
    assert replicas[1].connections == [[*ATTEST, "POST /run"]]
    with pytest.raises(KeyBindingError):
        asyncio.run(run(impostor.url))
    assert impostor.request_bytes == [0]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_openai_sdk_transport_checks_each_new_connection(
    replicas: list[Replica], impostor: Replica, asynchronous: bool
) -> None:
    httpx2 = pytest.importorskip("httpx2")
    gate = gate_for(replicas[0].url, AttestedKeys(max_keys=3))

    def post(url: str) -> None:
        transport = gated_httpx2_transport(gate, asynchronous=asynchronous)
        if not asynchronous:
            with httpx2.Client(transport=transport) as http:
                http.post(url + "/run", content=b"x")
            return

        async def go() -> None:
            async with httpx2.AsyncClient(transport=transport) as http:
                await http.post(url + "/run", content=b"x")

        asyncio.run(go())

    post(replicas[2].url)
    assert replicas[2].connections == [[*ATTEST, "POST /run"]]
    with pytest.raises(KeyBindingError):
        post(impostor.url)
    assert impostor.request_bytes == [0]


def test_a_server_gone_during_attestation_is_a_retryable_connection_failure() -> None:
    """The peer completes the handshake and closes: a connection error, never bad evidence."""
    identity = make_tls_identity()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def close_after_handshake() -> None:
        raw, _ = listener.accept()
        with identity.ssl_context.wrap_socket(raw, server_side=True) as sock:
            sock.recv(1)

    thread = threading.Thread(target=close_after_handshake, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{port}"
    gate = gate_for(url, AttestedKeys(max_keys=2))
    with pytest.raises(ConnectionFailedError):
        attest_first(gate, 5.0)
    thread.join(5)
    listener.close()
    with contextlib.closing(pool(url, gate)) as dead, pytest.raises(httpx.ConnectError):
        dead.request("POST", "/run", {}, b"x")


def test_which_broken_requests_are_sent_again() -> None:
    upload = Call("PUT", "/v2/repository/models/m/upload", content=b"model")
    infer = infer_call("m", {}, None)
    request = httpx.Request("POST", "https://h/x")
    for idempotent in (infer, INDEX_CALL, Call("GET", "/v2/models/m", idempotent=True)):
        assert broken_retryable(idempotent, httpx.ReadError("reset", request=request))
        assert broken_retryable(idempotent, httpx.RemoteProtocolError("closed", request=request))
    assert not broken_retryable(upload, httpx.ReadError("reset", request=request))
    assert not broken_retryable(upload, httpx.WriteError("broken pipe", request=request))
    assert broken_retryable(upload, httpx.ConnectError("refused", request=request))
    assert not broken_retryable(infer, httpx.ReadTimeout("slow", request=request))
    refused = httpx.ConnectError("bad certificate", request=request)
    refused.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
    assert not broken_retryable(infer, refused)


def test_the_boot_evidence_request_is_a_bare_get_and_extra_bytes_spoil_the_connection() -> None:
    exchange = BootEvidenceExchange("h:1")
    assert exchange.data.startswith(b"GET /v2/attestation HTTP/1.1\r\nhost: h:1\r\n")
    assert exchange.data.endswith(b"\r\n\r\n")
    body = b'{"kind": "x"}'
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
    assert exchange.receive(head + body + b"HTTP/1.1 200 OK\r\n") == body
    assert not exchange.reusable  # bytes after the answer: the connection is not used again
    clean = BootEvidenceExchange("h:1")
    assert clean.receive(head + body) == body
    assert clean.reusable


def test_an_idle_connection_whose_key_aged_out_is_not_reused(replicas: list[Replica]) -> None:
    clock = Clock()
    a = replicas[0]
    gate = gate_for(a.url, AttestedKeys(max_keys=3, max_age_seconds=60, clock=clock))
    with contextlib.closing(pool(a.url, gate)) as one:
        one.request("POST", "/run", {}, b"x")
        one.request("POST", "/run", {}, b"x")  # the same connection, reused
        clock.now += 61
        one.request("POST", "/run", {}, b"x")  # a new one, attested again
    assert a.connections == [[*ATTEST, "POST /run", "POST /run"], [*ATTEST, "POST /run"]]


def test_bytes_after_the_evidence_answer_end_the_connection_before_any_request() -> None:
    identity = make_tls_identity()
    chatty = Replica(identity, identity, after_evidence=b"HTTP/1.1 200 OK\r\n")
    with running(chatty):
        gate = gate_for(chatty.url, AttestedKeys(max_keys=2))
        with contextlib.closing(pool(chatty.url, gate)) as one, pytest.raises(httpx.ConnectError):
            one.request("POST", "/run", {}, b"x")
    assert chatty.connections == [["POST /v2/attestation"]]
    assert chatty.request_bytes == [0]


def test_the_proxy_attests_a_new_replica_key_on_its_connection_and_refuses_an_impostor(
    replicas: list[Replica], impostor: Replica
) -> None:
    """The proxy's upstream pool (`ProxyConfig(replicas=N)`) runs the same check."""
    from blindinfer.proxy.forward import AttestedUpstream, NotAttested, ProxyConfig
    from blindinfer.proxy.upstream import PinnedPool

    a = replicas[0]
    config = ProxyConfig(upstream=a.url, policy={}, simulation=True, replicas=3)
    upstream = AttestedUpstream(config)
    upstream.gate = gate_for(a.url, AttestedKeys(max_keys=3))  # no policy: simulation only

    async def connect(replica: Replica) -> None:
        pool = PinnedPool(
            "127.0.0.1",
            replica.port,
            gated_context(),
            upstream.check_connection,
            timeout=5.0,
            max_connections=4,
        )
        try:
            connection = await pool.acquire()
            pool.release(connection, reusable=True)
            connection = await pool.acquire(fresh=True)  # known key: no attestation
            pool.release(connection, reusable=False)
        finally:
            pool.aclose()

    asyncio.run(connect(a))
    assert a.connections == [ATTEST, []]
    with pytest.raises(NotAttested) as refused:
        asyncio.run(connect(impostor))
    assert refused.value.status == 502
    assert refused.value.document["attestation_error"] == "KeyBindingError"
    assert impostor.connections == [ATTEST]
    assert impostor.request_bytes == [0]
