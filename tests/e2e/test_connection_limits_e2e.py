"""Slow, unfinished and oversized requests against a real server process (issue 21,
items 3 and 6), over real TLS sockets, with small settings so that each attack ends in
seconds:

- bodies: a chunked upload that stalls is cut (408) after --body-timeout-s and what it
  sent is freed; bodies beyond --max-concurrent-bodies are refused at once (503); a
  tenant's unfinished bodies count against its concurrency slot before they are read
  (429); a chunked upload is held to the tenant's quota and to --max-model-bytes while
  it streams, and to the name and room checks before;
- heads: a 1 MiB header and 20,000 headers are answered 431 at once;
- connections: a connection that never sends a byte, never finishes its TLS handshake,
  or sends its head byte by byte (slowloris) is closed after --header-timeout-s; with
  --max-connections idle connections open, a legitimate client is still served and the
  server's file descriptors stay bounded;
- the BlindAI-compatible listeners enforce the same bounds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

import blindinfer
from blindinfer.client.transport import pinned_context
from blindinfer.server.app import build_state, close_state
from blindinfer.server.auth import generate_api_key
from blindinfer.server.blindai import BlindAiListeners
from blindinfer.server.config import ConnectionLimits, Limits, ServerConfig
from blindinfer.server.platforms import select_platform
from blindinfer.server.process import ServerProcess, start_server
from blindinfer.server.tls import make_tls_identity
from support import onnx_models as zoo
from support.procmem import rss_bytes

from .conftest import policy_for

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.5
MIN_BODY_RATE = 4 << 20  # a 4 MiB chunk buys one more second
MAX_CONNECTIONS = 12
MAX_BODIES = 3
LIMITS = Limits(max_model_bytes=2_000_000)
QUOTA_BYTES = 300_000
WAIT_S = 10.0  # socket timeout: far above every bound under test
UPLOAD = "/v2/repository/models/{name}/upload"
CONNECTION_ARGS = [
    f"--header-timeout-s={HEADER_TIMEOUT_S}",
    f"--body-timeout-s={BODY_TIMEOUT_S}",
    f"--min-body-rate={MIN_BODY_RATE}",
    f"--max-connections={MAX_CONNECTIONS}",
    f"--max-concurrent-bodies={MAX_BODIES}",
]


@dataclass
class Served:
    server: ServerProcess
    keys: dict[str, str]
    context: ssl.SSLContext

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.url.removeprefix("https://").rsplit(":", 1)
        return host.strip("[]"), int(port)

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def http(self, key: str = "admin") -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url,
            verify=self.context,
            headers={"Authorization": f"Bearer {self.keys[key]}"},
            timeout=WAIT_S,
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("connections")
    keys: dict[str, str] = {}
    config = ""
    for tenant, quota, roles in (
        ("ops", "", ("admin",)),
        ("a", "max_concurrent_inferences = 2\n", ("owner", "user")),
        ("q", f"max_stored_bytes = {QUOTA_BYTES}\n", ("owner_q",)),
    ):
        config += f'[[tenant]]\nname = "{tenant}"\n{quota}'
        for label in roles:
            key, sha = generate_api_key()
            keys[label] = key
            role = label.removesuffix("_q")
            config += f'[[tenant.key]]\nid = "{label}"\nrole = "{role}"\nsha256 = "{sha}"\n'
    auth = base / "auth.toml"
    auth.write_text(config)
    args = [
        "--simulation",
        f"--auth-file={auth}",
        f"--max-model-bytes={LIMITS.max_model_bytes}",
        *CONNECTION_ARGS,
    ]
    with start_server(args) as server:
        policy = policy_for(ServerConfig(simulation=True, limits=LIMITS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            with blindinfer.connect(server.url, policy=policy, simulation=True) as client:
                certificate = client.attestation.certificate_der
        yield Served(server, keys, pinned_context(certificate))


@pytest.fixture(autouse=True)
def still_serving(served: Served) -> Iterator[None]:
    yield
    with served.http() as http:
        assert http.get("/v2/health/ready").json() == {"ready": True}


# ----------------------------------------------------------------- raw HTTP over TLS


def _tls(address: tuple[str, int], context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(address, timeout=WAIT_S)
    return context.wrap_socket(sock, server_hostname="blindinfer")


def _head(method: str, path: str, key: str | None, *, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: blindinfer"]
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    document: dict[str, str]
    seconds: float


def _read_answer(tls: ssl.SSLSocket, started: float, data: bytes = b"") -> Answer:
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, f"the server closed without answering: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers["content-length"]):
        chunk = tls.recv(65536)
        assert chunk, "the server closed mid-answer"
        body += chunk
    seconds = time.monotonic() - started
    if headers.get("content-type") == "application/json":
        document = json.loads(body)
    else:  # a BlindAI app's CBOR error: its code is in a header
        document = {"code": headers.get("x-blindinfer-error-code", "")}
    return Answer(int(status_line.split()[1]), headers, document, seconds)


def _closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes `sock` (EOF or reset), reading and dropping
    whatever it sends first."""
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        pass
    return time.monotonic() - started


def _received(tls: ssl.SSLSocket) -> bytes | None:
    """Application data the server has sent so far (b"" if it closed), None if none:
    without blocking, and past TLS records that carry none (session tickets)."""
    tls.setblocking(False)
    try:
        return tls.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        tls.settimeout(WAIT_S)


def _send_until_answered(tls: ssl.SSLSocket, pieces: list[bytes]) -> bytes:
    """Sends `pieces` in turn, stopping as soon as the server has answered or closed;
    returns what it answered so far (for `_read_answer`)."""
    for piece in pieces:
        answered = _received(tls)
        if answered is not None:
            return answered
        try:
            tls.sendall(piece)
        except OSError:
            break
    return b""


def _upload_ok(served: Served, name: str) -> None:
    with served.http() as http:
        reply = http.put(UPLOAD.format(name=name), content=zoo.model_bytes(zoo.mlp_model()))
    assert reply.status_code in (200, 201), reply.text


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ----------------------------------------------------------------- bodies


def _stalled_uploads(served: Served, count: int, size: int) -> list[Answer]:
    """`count` chunked uploads that send `size` bytes, then nothing: their answers."""
    started = time.monotonic()
    sockets = []
    for n in range(count):
        tls = _tls(served.address, served.context)
        tls.sendall(_head("PUT", UPLOAD.format(name=f"stalled{n}"), served.keys["admin"]))
        tls.sendall(_chunk(bytes(size)))
        sockets.append(tls)
    try:
        return [_read_answer(tls, started) for tls in sockets]
    finally:
        for tls in sockets:
            tls.close()


def test_stalled_chunked_uploads_are_cut_and_their_memory_freed(served: Served) -> None:
    size = LIMITS.max_model_bytes - 1  # the most one upload may hold
    baseline = rss_bytes(served.pid)
    for _ in range(3):
        answers = _stalled_uploads(served, MAX_BODIES, size)
        for answer in answers:
            assert answer.status == 408, answer
            assert answer.document["code"] == "request_timeout"
            assert answer.headers["connection"] == "close"
            # cut once silent for --body-timeout-s, whatever it sent before
            assert answer.seconds < BODY_TIMEOUT_S + 5
    # the stalled bodies were dropped with their requests: three rounds of them do not add
    # up (generous: allocator slack and the server's own buffers)
    grown = rss_bytes(served.pid) - baseline
    assert grown < 3 * MAX_BODIES * size, grown
    with served.http() as http:
        assert http.post("/v2/repository/index").json() == []


def test_bodies_beyond_the_server_wide_bound_are_refused_at_once(served: Served) -> None:
    held = []
    try:
        for n in range(MAX_BODIES):
            tls = _tls(served.address, served.context)
            tls.sendall(_head("PUT", UPLOAD.format(name=f"held{n}"), served.keys["admin"]))
            tls.sendall(_chunk(bytes(1024)))
            held.append(tls)
        time.sleep(0.3)  # all of them are being received now
        started = time.monotonic()
        with _tls(served.address, served.context) as extra:
            extra.sendall(_head("PUT", UPLOAD.format(name="extra"), served.keys["owner"]))
            extra.sendall(_chunk(bytes(1024)))
            answer = _read_answer(extra, started)
        assert answer.status == 503, answer
        assert answer.document["code"] == "overloaded"
        assert "--max-concurrent-bodies" in answer.document["error"]
        assert answer.headers["retry-after"] == "1"
        assert answer.seconds < BODY_TIMEOUT_S  # before any of the held bodies timed out
    finally:
        for tls in held:
            tls.close()
    deadline = time.monotonic() + WAIT_S
    while True:  # the held bodies are released once the server sees them gone
        with served.http() as http:
            reply = http.put(UPLOAD.format(name="after"), content=zoo.model_bytes(zoo.mlp_model()))
        if reply.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply.status_code in (200, 201), reply.text
    with served.http() as http:
        assert http.delete("/v2/repository/models/after").status_code == 200


def test_a_tenants_unfinished_bodies_count_against_its_slots_before_they_are_read(
    served: Served,
) -> None:
    _upload_ok(served, "mlp")  # as ops, shared with nobody: give tenant a its own
    with served.http("owner") as http:
        reply = http.put(UPLOAD.format(name="mine"), content=zoo.model_bytes(zoo.mlp_model()))
        assert reply.status_code in (200, 201), reply.text
    infer = "/v2/models/mine/infer"
    held = []
    try:
        for _ in range(2):  # tenant a's max_concurrent_inferences, from a run-only key
            tls = _tls(served.address, served.context)
            tls.sendall(_head("POST", infer, served.keys["user"], length=1 << 20) + b"{")
            held.append(tls)
        time.sleep(0.3)
        started = time.monotonic()
        with _tls(served.address, served.context) as third:
            third.sendall(_head("POST", infer, served.keys["user"], length=1 << 20) + b"{")
            answer = _read_answer(third, started)
        assert answer.status == 429, answer
        assert answer.document["code"] == "too_many_concurrent"
        assert answer.seconds < BODY_TIMEOUT_S
        # another tenant is not affected
        with served.http() as http:
            assert http.get("/v2/models/mlp").status_code == 200
    finally:
        for tls in held:
            tls.close()
    with served.http() as http:
        assert http.delete("/v2/repository/models/mlp").status_code == 200
    with served.http("owner") as http:
        assert http.delete("/v2/repository/models/mine").status_code == 200


def test_a_chunked_upload_is_held_to_the_quota_and_size_while_it_streams(served: Served) -> None:
    cases = (
        ("owner_q", "quota_exceeded", 403),  # QUOTA_BYTES, enforced while streaming
        ("admin", "payload_too_large", 413),  # --max-model-bytes
    )
    for key, code, status in cases:
        started = time.monotonic()
        with _tls(served.address, served.context) as tls:
            tls.sendall(_head("PUT", UPLOAD.format(name="big"), served.keys[key]))
            pieces = [_chunk(bytes(64 << 10)) for _ in range(LIMITS.max_model_bytes // 65536 + 8)]
            early = _send_until_answered(tls, pieces)
            answer = _read_answer(tls, started, early)
        assert (answer.status, answer.document["code"]) == (status, code), answer
        assert answer.headers["connection"] == "close"
    # an invalid name is refused before the chunked body, as with Content-Length
    started = time.monotonic()
    with _tls(served.address, served.context) as tls:
        tls.sendall(_head("PUT", UPLOAD.format(name="bad%20name"), served.keys["admin"]))
        tls.sendall(_chunk(bytes(1024)))
        answer = _read_answer(tls, started)
    assert answer.status == 400, answer
    with served.http() as http:
        assert http.post("/v2/repository/index").json() == []


# ----------------------------------------------------------------- heads


@pytest.mark.parametrize(
    "head",
    [
        b"X-Large: " + b"a" * (1 << 20) + b"\r\n",
        b"".join(b"X-%d: a\r\n" % n for n in range(20_000)),
    ],
    ids=["1MiB-header", "20000-headers"],
)
def test_oversized_heads_are_refused_431_at_once(served: Served, head: bytes) -> None:
    data = b"GET /v2/health/live HTTP/1.1\r\nHost: blindinfer\r\n" + head + b"\r\n"
    started = time.monotonic()
    with _tls(served.address, served.context) as tls:
        pieces = [data[i : i + 16384] for i in range(0, len(data), 16384)]
        answer = _read_answer(tls, started, _send_until_answered(tls, pieces))
        assert answer.status == 431, answer
        assert answer.document["code"] == "headers_too_large"
        assert answer.seconds < 3  # httptools took the megabyte in quadratic time
        assert _closed_after(tls) < 3


# ----------------------------------------------------------------- connections


def test_silent_and_slow_connections_are_closed_after_the_header_timeout(
    served: Served,
) -> None:
    silent = socket.create_connection(served.address, timeout=WAIT_S)  # no TLS hello
    idle_tls = _tls(served.address, served.context)  # handshake, then nothing
    slow = _tls(served.address, served.context)
    slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: blindinfer\r\nX-Slow: ")
    stop = threading.Event()

    def trickle() -> None:  # slowloris: one byte a tenth of a second, forever
        while not stop.wait(0.1):
            try:
                slow.send(b"a")
            except OSError:
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        for sock in (silent, idle_tls):
            waited = _closed_after(sock)
            assert waited < HEADER_TIMEOUT_S + 5
        started = time.monotonic()
        data = b""
        try:
            while chunk := slow.recv(65536):
                data += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 5
        assert data.startswith(b"HTTP/1.1 408 "), data
    finally:
        stop.set()
        sender.join()
        for sock in (silent, idle_tls, slow):
            sock.close()


def test_idle_connections_cannot_lock_out_a_client_nor_use_up_descriptors(
    served: Served,
) -> None:
    baseline = _fds(served.pid)
    idle = [socket.create_connection(served.address) for _ in range(3 * MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)
        # never more than the limit open, whatever the number of attackers' sockets
        assert _fds(served.pid) <= baseline + MAX_CONNECTIONS + 2
        started = time.monotonic()
        with served.http() as http:
            assert http.get("/v2/health/live").json() == {"live": True}
        assert time.monotonic() - started < 3  # at once, not after the idle ones expire
    finally:
        for sock in idle:
            sock.close()


# ----------------------------------------------------------------- BlindAI listeners


@pytest.fixture(scope="module")
def blindai() -> Iterator[BlindAiListeners]:
    config = ServerConfig(
        simulation=True,
        connections=ConnectionLimits(
            header_timeout_s=HEADER_TIMEOUT_S,
            body_timeout_s=BODY_TIMEOUT_S,
            min_body_rate=MIN_BODY_RATE,
            max_connections=MAX_CONNECTIONS,
            max_concurrent_bodies=MAX_BODIES,
        ),
    )
    state = build_state(config, select_platform(config), make_tls_identity())
    running = BlindAiListeners(state, "127.0.0.1", (0, 0, 0))
    running.start()
    try:
        yield running
    finally:
        running.stop()
        close_state(state)


def _any_certificate() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the bounds under test come before any trust
    return context


def test_the_blindai_listeners_bound_heads_bodies_and_connections(
    blindai: BlindAiListeners,
) -> None:
    run = ("127.0.0.1", blindai.ports[1])
    management = ("127.0.0.1", blindai.ports[2])
    context = _any_certificate()
    # a 1 MiB header
    data = b"POST /run HTTP/1.1\r\nHost: blindai-srv\r\nX-Large: " + b"a" * (1 << 20)
    started = time.monotonic()
    with _tls(run, context) as tls:
        pieces = [data[i : i + 16384] for i in range(0, len(data), 16384)]
        answer = _read_answer(tls, started, _send_until_answered(tls, pieces))
    assert (answer.status, answer.document["code"]) == (431, "headers_too_large")
    # a stalled upload body (BlindAI allowed 1 GiB per connection, for ever)
    started = time.monotonic()
    with _tls(management, context) as tls:
        tls.sendall(_head("POST", "/upload", None) + _chunk(bytes(1 << 20)))
        answer = _read_answer(tls, started)
    assert (answer.status, answer.document["code"]) == (408, "request_timeout"), answer
    assert answer.seconds < BODY_TIMEOUT_S + 5
    # an idle TLS connection, and connections past the limit
    with _tls(run, context) as idle:
        assert _closed_after(idle) < HEADER_TIMEOUT_S + 5
    assert len(blindai.guard) <= MAX_CONNECTIONS
    idle_sockets = [socket.create_connection(run) for _ in range(2 * MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)
        assert len(blindai.guard) <= MAX_CONNECTIONS
        with httpx.Client(verify=False, timeout=WAIT_S) as http:
            reply = http.get(f"http://127.0.0.1:{blindai.ports[0]}/")
        assert reply.status_code == 200
    finally:
        for sock in idle_sockets:
            sock.close()


def test_closed_and_evicted_connections_leave_nothing_behind() -> None:
    """Connections closed in their TLS handshake (evicted, or past the header timeout)
    must not stay registered: uvicorn waits for every registered one when it stops (one
    such leak made SIGTERM hang until the process was killed)."""
    args = ["--simulation", f"--header-timeout-s={HEADER_TIMEOUT_S}", "--max-connections=4"]
    with start_server(args) as server:
        host, port = server.url.removeprefix("https://").rsplit(":", 1)
        idle = [socket.create_connection((host, int(port))) for _ in range(12)]
        time.sleep(0.5)
        for sock in idle:
            sock.close()
        silent = socket.create_connection((host, int(port)))
        assert _closed_after(silent) < HEADER_TIMEOUT_S + 5
        silent.close()
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
        assert server.process.returncode in (0, -signal.SIGTERM)  # not killed
