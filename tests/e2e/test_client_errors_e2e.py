"""Every failure of `connect()`, `Client` and `AsyncClient` is a `blindinfer.BlindInferError`
with the transport's exception as `__cause__`: against a port nobody listens on, a plain TCP
listener that resets each connection, one that never answers, a TLS listener that hangs up
mid-request, a fake server that keeps refusing with 503; and against the real server, the
arguments that are refused before anything is sent. `Tensor` takes OIP datatype names and
numpy dtypes alike, with bit-identical results."""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import socket
import struct
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import blindinfer
from blindinfer.client.async_client import AsyncClient
from blindinfer.client.client import Client
from blindinfer.protocol.datatypes import dtype_to_datatype
from blindinfer.server.process import ServerProcess
from blindinfer.server.tls import TlsIdentity, make_tls_identity
from support import onnx_models as zoo

from .test_inference_e2e import assert_bit_identical, in_process

pytestmark = pytest.mark.e2e

QUICK = blindinfer.RetryPolicy(max_attempts=3, backoff=0.01, max_backoff=0.01, jitter=0)


def _connect(url: str, policy: blindinfer.Policy, **options: Any) -> blindinfer.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(url, policy=policy, simulation=True, **options)


def _connect_async(url: str, policy: blindinfer.Policy, **options: Any) -> None:
    async def go() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = await blindinfer.connect_async(url, policy=policy, simulation=True, **options)
        await client.close()

    asyncio.run(go())


def _raised(action: Callable[[], object], kind: type[BaseException]) -> BaseException:
    with pytest.raises(blindinfer.BlindInferError) as caught:
        action()
    assert type(caught.value) is kind, repr(caught.value)
    assert caught.value.__cause__ is not None
    assert "\n" not in str(caught.value)
    return caught.value


# -- listeners -------------------------------------------------------------------------------


@pytest.fixture
def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class _Listener:
    """A loopback TCP listener; `serve(conn)` runs for each accepted connection."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._socket.getsockname()[1]}"
        self.accepted = 0
        self._serve = serve
        self._held: list[socket.socket] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._socket.close()
        for conn in self._held:
            conn.close()


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # linger 0: the peer gets a TCP RST


@pytest.fixture
def resetting() -> Iterator[_Listener]:
    """Plain TCP: accepts, then resets the connection before a TLS byte is exchanged."""
    listener = _Listener(_reset)
    yield listener
    listener.close()


@pytest.fixture
def silent() -> Iterator[_Listener]:
    """Plain TCP: accepts and never says anything (the handshake times out)."""
    listener = _Listener(lambda conn: None)
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def identity() -> TlsIdentity:
    return make_tls_identity("fake")


@pytest.fixture
def hanging_up(identity: TlsIdentity) -> Iterator[_Listener]:
    """TLS with its own certificate: completes the handshake, reads the request, closes."""

    def serve(conn: socket.socket) -> None:
        try:
            with identity.ssl_context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)
        except OSError:
            pass

    listener = _Listener(serve)
    yield listener
    listener.close()


def _pinned_to(attestation: blindinfer.VerifiedAttestation, identity: TlsIdentity) -> Any:
    """The attestation as if it had bound `identity`'s key, so the pin lets the fake in."""
    return dataclasses.replace(attestation, certificate_der=identity.certificate_der)


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers 503 overloaded (Retry-After: 0) `refusals` times per server, then 200 []."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        server: Any = self.server
        server.seen += 1
        if server.seen <= server.refusals:
            body = json.dumps({"error": "queue full", "code": "overloaded"}).encode()
            self.send_response(503)
            self.send_header("retry-after", "0")
        else:
            body = server.body
            self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def refusing(identity: TlsIdentity) -> Iterator[Any]:
    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    server.socket = identity.ssl_context.wrap_socket(server.socket, server_side=True)
    server.seen, server.refusals, server.body = 0, 0, b"[]"
    server.url = f"https://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


# -- connect() and connect_async() -----------------------------------------------------------


def test_connect_to_a_port_nobody_listens_on(free_port: int, policy: blindinfer.Policy) -> None:
    url = f"https://127.0.0.1:{free_port}"
    for attempt in (lambda: _connect(url, policy), lambda: _connect_async(url, policy)):
        error = _raised(attempt, blindinfer.ConnectionFailedError)
        assert isinstance(error.__cause__, httpx.ConnectError)
        assert str(error) == (
            f"cannot connect to {url}: connection refused (is the server running, and on "
            "this port?)"
        )


def test_connect_to_an_unknown_host(policy: blindinfer.Policy) -> None:
    url = "https://nohost.invalid:9924"
    for attempt in (lambda: _connect(url, policy), lambda: _connect_async(url, policy)):
        error = _raised(attempt, blindinfer.ConnectionFailedError)
        assert str(error).startswith(f"unknown host 'nohost.invalid' in {url}")


def test_connect_to_a_listener_that_resets(resetting: _Listener, policy: blindinfer.Policy) -> None:
    for attempt in (
        lambda: _connect(resetting.url, policy),
        lambda: _connect_async(resetting.url, policy),
    ):
        error = _raised(attempt, blindinfer.ConnectionFailedError)
        assert isinstance(error.__cause__, httpx.ConnectError)
        assert f"TLS handshake with {resetting.url} failed" in str(error)
        assert "HTTPS port" in str(error)
    assert resetting.accepted >= 2


def test_connect_to_a_listener_that_never_answers(
    silent: _Listener, policy: blindinfer.Policy
) -> None:
    for attempt in (
        lambda: _connect(silent.url, policy, timeout=0.3),
        lambda: _connect_async(silent.url, policy, timeout=0.3),
    ):
        error = _raised(attempt, blindinfer.ConnectionFailedError)
        assert isinstance(error.__cause__, httpx.TimeoutException)
        assert str(error).startswith(f"timed out after 0.3 s connecting to {silent.url}")


def test_connect_to_a_plain_http_port(server: ServerProcess, policy: blindinfer.Policy) -> None:
    """TLS to something that answers in plain HTTP: the real server's refusal is not TLS."""

    def plain_http(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        conn.close()

    listener = _Listener(plain_http)
    try:
        error = _raised(lambda: _connect(listener.url, policy), blindinfer.ConnectionFailedError)
        assert "failed: the answer is not TLS" in str(error)
    finally:
        listener.close()


@pytest.mark.parametrize(
    "url", ["127.0.0.1:9924", "http://127.0.0.1:9924", "https://127.0.0.1:99999", ""]
)
def test_unusable_urls_are_refused_before_connecting(url: str, policy: blindinfer.Policy) -> None:
    with pytest.raises(blindinfer.UsageError, match="https://"):
        _connect(url, policy)
    with pytest.raises(blindinfer.UsageError, match="https://"):
        _connect_async(url, policy)


def test_policy_paths_are_checked(
    server: ServerProcess, policy: blindinfer.Policy, tmp_path: Path
) -> None:
    missing = tmp_path / "policy.toml"
    for attempt in (
        lambda: _connect(server.url, missing),  # type: ignore[arg-type]
        lambda: _connect_async(server.url, missing),  # type: ignore[arg-type]
    ):
        with pytest.raises(blindinfer.UsageError, match="does not exist") as caught:
            attempt()
        assert str(missing) in str(caught.value)
    with pytest.raises(blindinfer.UsageError, match="is a directory"):
        _connect(server.url, tmp_path)  # type: ignore[arg-type]
    missing.write_text("[sgx]\nmrenclave = 'not hex'\n")
    with pytest.raises(blindinfer.PolicyError):
        _connect(server.url, missing)  # type: ignore[arg-type]


# -- requests of a connected client ----------------------------------------------------------


def _every_request(client: Client) -> list[Callable[[], object]]:
    x = np.zeros((1, 4), np.float32)
    return [
        lambda: client.upload_model(b"model bytes", name="m"),
        lambda: client.run_model("m", {"x": x}),
        lambda: client.run_model("m", x),  # asks for the metadata first
        lambda: client.model_metadata("m"),
        lambda: client.list_models(),
        lambda: client.delete_model("m"),
        lambda: client.share_model("m", ["*"]),
        lambda: client.boot_evidence(),
    ]


def _every_async_request(
    client: AsyncClient,
) -> list[Callable[[], Awaitable[object]]]:
    x = np.zeros((1, 4), np.float32)
    return [
        lambda: client.upload_model(b"model bytes", name="m"),
        lambda: client.run_model("m", {"x": x}),
        lambda: client.run_model("m", x),
        lambda: client.model_metadata("m"),
        lambda: client.list_models(),
        lambda: client.delete_model("m"),
        lambda: client.share_model("m", ["*"]),
    ]


def _each_fails(
    url: str, attestation: Any, kind: type[BaseException], phrase: str
) -> list[BaseException]:
    """Runs every request of a Client and an AsyncClient at `url`; each must raise `kind`."""
    errors: list[BaseException] = []
    with Client(url, attestation, timeout=5, retry=QUICK) as client:
        for request in _every_request(client):
            errors.append(_raised(request, kind))

    async def scenario() -> None:
        async with AsyncClient(url, attestation, timeout=5, retry=QUICK) as client:
            for request in _every_async_request(client):
                with pytest.raises(blindinfer.BlindInferError) as caught:
                    await request()
                errors.append(caught.value)

    asyncio.run(scenario())
    for error in errors:
        assert type(error) is kind, repr(error)
        assert error.__cause__ is not None
        assert phrase in str(error), str(error)
    return errors


def test_requests_to_a_server_that_went_away(free_port: int, client: blindinfer.Client) -> None:
    url = f"https://127.0.0.1:{free_port}"
    for error in _each_fails(
        url, client.attestation, blindinfer.ConnectionFailedError, "connection refused"
    ):
        assert isinstance(error.__cause__, httpx.ConnectError)


def test_requests_to_a_listener_that_resets(
    resetting: _Listener, client: blindinfer.Client
) -> None:
    _each_fails(
        resetting.url,
        client.attestation,
        blindinfer.ConnectionFailedError,
        f"TLS handshake with {resetting.url} failed",
    )


def test_requests_cut_off_mid_request(
    hanging_up: _Listener, identity: TlsIdentity, client: blindinfer.Client
) -> None:
    errors = _each_fails(
        hanging_up.url,
        _pinned_to(client.attestation, identity),
        blindinfer.ConnectionFailedError,
        f"the connection to {hanging_up.url} broke during ",
    )
    assert "during PUT /v2/repository/models/m/upload" in str(errors[0])
    assert "during POST /v2/models/m/infer" in str(errors[1])


def test_requests_to_another_key_are_refused_by_the_pin(
    hanging_up: _Listener, client: blindinfer.Client
) -> None:
    """The fake's certificate is not the attested one: no request reaches it."""
    _each_fails(
        hanging_up.url,
        client.attestation,
        blindinfer.KeyBindingError,
        "did not present the attested TLS certificate",
    )


def test_refusals_are_retried_and_the_last_one_raised(
    refusing: Any, identity: TlsIdentity, client: blindinfer.Client
) -> None:
    attestation = _pinned_to(client.attestation, identity)
    refusing.refusals = 2  # then 200: retried through
    with Client(refusing.url, attestation, timeout=5, retry=QUICK) as retried:
        assert retried.list_models() == []
    assert refusing.seen == 3

    refusing.seen, refusing.refusals = 0, 10  # more than QUICK's 3 attempts
    with (
        Client(refusing.url, attestation, timeout=5, retry=QUICK) as retried,
        pytest.raises(blindinfer.ServerError) as caught,
    ):
        retried.list_models()
    assert (caught.value.status, caught.value.code) == (503, "overloaded")
    assert refusing.seen == 3

    async def scenario() -> blindinfer.ServerError:
        async with AsyncClient(refusing.url, attestation, timeout=5, retry=QUICK) as retried:
            with pytest.raises(blindinfer.ServerError) as refused:
                await retried.list_models()
            refusing.seen, refusing.refusals = 0, 1
            assert await retried.list_models() == []
        return refused.value

    refusing.seen = 0
    assert asyncio.run(scenario()).status == 503
    assert refusing.seen == 2


def test_malformed_answers_are_protocol_errors(
    refusing: Any, identity: TlsIdentity, client: blindinfer.Client
) -> None:
    refusing.body = b'{"not": "a list"}'
    with Client(refusing.url, _pinned_to(client.attestation, identity), timeout=5) as fake:
        with pytest.raises(blindinfer.ProtocolError, match="not the API's") as caught:
            fake.list_models()
        assert caught.value.__cause__ is not None
        refusing.body = b"not json"
        with pytest.raises(blindinfer.ProtocolError, match="not the API's"):
            fake.model_metadata("m")


# -- arguments refused before anything is sent -----------------------------------------------


def test_model_paths_that_are_not_model_files(client: blindinfer.Client, tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    with pytest.raises(blindinfer.UsageError, match="does not exist") as caught:
        client.upload_model(missing)
    assert str(missing) in str(caught.value)
    with pytest.raises(blindinfer.UsageError, match="is a directory") as caught:
        client.upload_model(tmp_path)
    assert str(tmp_path) in str(caught.value)

    async def scenario() -> None:
        async with AsyncClient(client.url, client.attestation, timeout=10) as other:
            with pytest.raises(blindinfer.UsageError, match="does not exist"):
                await other.upload_model(str(missing))

    asyncio.run(scenario())


def test_oip_and_numpy_dtype_names_give_identical_results(client: blindinfer.Client) -> None:
    model = zoo.model_bytes(zoo.dtype_identity_model())
    info = client.upload_model(model, name="dtype-names")
    feed = zoo.dtype_identity_feed(2, 3)
    want = in_process(model, feed)
    try:
        by_oip_name = {
            name: blindinfer.Tensor(a.ravel().tolist(), dtype_to_datatype(a.dtype), a.shape)
            for name, a in feed.items()
        }
        by_numpy_name = {
            name: blindinfer.Tensor(a.ravel().tolist(), str(a.dtype), a.shape)
            for name, a in feed.items()
        }
        by_numpy_type = {
            name: blindinfer.Tensor(a.ravel().tolist(), a.dtype.type, a.shape)
            for name, a in feed.items()
        }
        for inputs in (by_oip_name, by_numpy_name, by_numpy_type):
            assert_bit_identical(client.run_model(info.model_id, inputs), want)
        with pytest.raises(blindinfer.UsageError, match="FP32"):
            client.run_model(info.model_id, {"in_float32": blindinfer.Tensor([1], "FP33", (1,))})
    finally:
        client.delete_model(info.model_id)
