"""`connect(..., transport="grpc")` against a real server started with --grpc-port: the same
outputs (bit for bit, against onnxruntime in process and the HTTPS transport), the same
errors and receipts as HTTPS; nothing goes over gRPC unless the attestation verified; a
gRPC port that presents another certificate is refused at the handshake."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import socket
import threading
import warnings
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

import blindinfer
from blindinfer.client.receipts import verify_proof
from blindinfer.server.auth import generate_api_key
from blindinfer.server.config import ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from blindinfer.server.tls import make_tls_identity
from support import onnx_models as zoo

from .conftest import policy_for
from .test_inference_e2e import assert_bit_identical, in_process

pytestmark = pytest.mark.e2e

MLP = zoo.model_bytes(zoo.mlp_model())
MULTI = zoo.model_bytes(zoo.multi_io_model())
POLICY = policy_for(ServerConfig(simulation=True))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """An auth file and its keys: tenant "a" with quotas above what the module sends (no
    429 slows it down), tenant "slow" with 2 requests, then one per 1000 s."""
    text, keys = "", {}
    for tenant, quotas in (
        ("a", "requests_per_second = 1000\nburst = 1000\nmax_concurrent_inferences = 16\n"),
        ("slow", "requests_per_second = 0.001\nburst = 2\n"),
    ):
        keys[tenant], sha = generate_api_key()
        text += (
            f'[[tenant]]\nname = "{tenant}"\n{quotas}'
            f'[[tenant.key]]\nid = "{tenant}-key"\nrole = "owner"\nsha256 = "{sha}"\n'
        )
    auth = tmp_path_factory.mktemp("grpc-auth") / "auth.toml"
    auth.write_text(text)
    return auth, keys


@pytest.fixture(scope="module")
def served(keys: tuple[Path, dict[str, str]]) -> Iterator[tuple[ServerProcess, int, str]]:
    """One server with API keys and a gRPC port; its gRPC port and tenant a's key."""
    port = _free_port()
    with start_server(["--simulation", f"--auth-file={keys[0]}", f"--grpc-port={port}"]) as server:
        yield server, port, keys[1]["a"]


def _connect(url: str, **options: Any) -> blindinfer.Client:
    options.setdefault("policy", POLICY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(url, simulation=True, **options)


@pytest.fixture(scope="module")
def both(served: tuple[ServerProcess, int, str]) -> Iterator[tuple[Any, Any]]:
    """An HTTPS client and a gRPC client (port from GET /v2) of the same key, with the
    test models uploaded."""
    server, _, key = served
    https = _connect(server.url, api_key=key)
    grpc_client = _connect(server.url, api_key=key, transport="grpc")
    https.upload_model(MLP, name="mlp")
    https.upload_model(MULTI, name="multi")
    with https, grpc_client:
        yield https, grpc_client


def _error(call: Any, *args: Any) -> blindinfer.BlindInferError:
    with pytest.raises(blindinfer.BlindInferError) as caught:
        call(*args)
    return caught.value


def test_outputs_are_bit_exact_and_the_same_on_both_transports(both: tuple[Any, Any]) -> None:
    https, grpc_client = both
    assert grpc_client.transport == "grpc"
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    want = in_process(MLP, {"x": x})
    assert_bit_identical(grpc_client.run_model("mlp", x), want)
    assert_bit_identical(grpc_client.run_model("mlp", x), https.run_model("mlp", x))
    feed = zoo.multi_io_feed()
    want = in_process(MULTI, feed)
    assert_bit_identical(grpc_client.run_model("multi", feed), want)
    assert_bit_identical(grpc_client.run_model("multi", feed), https.run_model("multi", feed))
    one = grpc_client.run_model("multi", feed, outputs=["mask_count"])
    assert_bit_identical(one, {"mask_count": want["mask_count"]})
    assert grpc_client.model_metadata("multi") == https.model_metadata("multi")


def test_one_grpc_client_serves_many_threads(both: tuple[Any, Any]) -> None:
    _, grpc_client = both
    feeds = [np.full((1, 64), i, np.float32) for i in range(32)]
    session = ort.InferenceSession(MLP, providers=["CPUExecutionProvider"])
    want = [{"probabilities": session.run(None, {"x": feed})[0]} for feed in feeds]
    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda feed: grpc_client.run_model("mlp", feed), feeds))
    for outputs, expected in zip(got, want, strict=True):
        assert_bit_identical(outputs, expected)


def test_receipts_verify_on_the_grpc_transport(both: tuple[Any, Any], tmp_path: Path) -> None:
    https, grpc_client = both
    x = np.ones((2, 64), np.float32)
    got = grpc_client.run_model("mlp", x, receipt=True)
    assert_bit_identical(dict(got), https.run_model("mlp", x))
    assert got.receipt.payload["kind"] == "inference"
    assert got.receipt.payload["model"]["sha256"] == hashlib.sha256(MLP).hexdigest()
    path = tmp_path / "proof.json"
    got.receipt.save(path)
    proof = json.loads(path.read_text())
    checked = verify_proof(proof, policy=POLICY, simulation=True, inputs={"x": x}, outputs=got)
    assert checked.payload == got.receipt.payload


def test_errors_are_the_same_on_both_transports(
    both: tuple[Any, Any], served: tuple[ServerProcess, int, str]
) -> None:
    https, grpc_client = both
    x = np.ones((1, 64), np.float32)
    for call in (
        lambda c: c.run_model("no-such-model", x),  # its metadata first (one input)
        lambda c: c.run_model("no-such-model", {"x": x}),  # ModelInfer itself
        lambda c: c.model_metadata("no-such-model"),
        lambda c: c.run_model("mlp", {"x": np.ones((1, 3), np.float32)}),
        lambda c: c.run_model("mlp", {"wrong": x}),
    ):
        over_https, over_grpc = _error(call, https), _error(call, grpc_client)
        assert type(over_grpc) is type(over_https) is blindinfer.ServerError
        assert str(over_grpc) == str(over_https)
    server, port, _ = served
    bad = "bik_" + "0" * 40  # and grpc_port= given (the other clients read GET /v2)
    with (
        _connect(server.url, api_key=bad) as https_bad,
        _connect(server.url, api_key=bad, transport="grpc", grpc_port=port) as grpc_bad,
    ):
        over_https = _error(lambda: https_bad.run_model("mlp", {"x": x}))
        over_grpc = _error(lambda: grpc_bad.run_model("mlp", {"x": x}))
    assert isinstance(over_grpc, blindinfer.ServerError)
    assert (over_grpc.status, over_grpc.code) == (401, "unauthorized")
    assert str(over_grpc) == str(over_https)


def test_a_rate_limited_call_is_the_same_refusal_and_honours_retry_after(
    served: tuple[ServerProcess, int, str],
    keys: tuple[Path, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tenant "slow" has 2 requests, then one per 1000 s: the third is refused (429
    rate_limited, `retry-after: 1000`); longer than the policy's `max_retry_after`, so it is
    raised at once on both transports, not backed off and sent again."""
    server, port, _ = served
    x = {"x": np.ones((1, 64), np.float32)}
    caplog.set_level(logging.INFO, logger="blindinfer.client")
    slow = keys[1]["slow"]
    with (
        _connect(server.url, api_key=slow) as https,
        _connect(server.url, api_key=slow, transport="grpc", grpc_port=port) as grpc_client,
    ):
        for client in (https, grpc_client):  # the two requests the bucket holds
            refused = _error(client.model_metadata, "nope")
            assert isinstance(refused, blindinfer.ServerError)
            assert refused.code == "unknown_model"
        over_https = _error(https.run_model, "nope", x)
        over_grpc = _error(grpc_client.run_model, "nope", x)
    assert isinstance(over_grpc, blindinfer.ServerError)
    assert isinstance(over_https, blindinfer.ServerError)
    assert (over_grpc.status, over_grpc.code) == (over_https.status, over_https.code)
    assert (over_grpc.status, over_grpc.code) == (429, "rate_limited")
    assert over_grpc.message.split("; retry in")[0] == over_https.message.split("; retry in")[0]
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


# -- nothing over gRPC without a verified attestation, and only to the attested key ------------


class _Listener:
    """A loopback TCP listener that counts the connections it accepts (and closes them)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_a_failed_attestation_sends_nothing_over_grpc(
    served: tuple[ServerProcess, int, str],
) -> None:
    server, _, key = served
    assert POLICY.sgx is not None
    wrong = dataclasses.replace(POLICY, sgx=dataclasses.replace(POLICY.sgx, mrenclave=(bytes(32),)))
    listener = _Listener()
    try:
        error = _error(
            lambda: _connect(
                server.url, policy=wrong, api_key=key, transport="grpc", grpc_port=listener.port
            )
        )
        assert type(error) is blindinfer.PolicyMismatchError
        assert listener.accepted == 0
        # the same port after a verified attestation: the channel does go there (and fails,
        # for nobody speaks TLS on it), so the count above could have moved
        error = _error(
            lambda: _connect(server.url, api_key=key, transport="grpc", grpc_port=listener.port)
        )
        assert type(error) is blindinfer.ConnectionFailedError
        assert listener.accepted >= 1
    finally:
        listener.close()


def test_a_grpc_port_with_another_certificate_is_refused_at_the_handshake(
    served: tuple[ServerProcess, int, str],
) -> None:
    """A real gRPC server on TLS with another key (same name) answers every OIP call and
    records it; connect() refuses it with KeyBindingError and it records nothing."""
    from blindinfer.protocol.oip_grpc import service

    server, _, key = served
    calls: list[str] = []

    def answer(name: str) -> Any:
        def handle(request: bytes, context: Any) -> bytes:
            calls.append(name)
            return b""

        return grpc.unary_unary_rpc_method_handler(handle)

    impostor = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    impostor.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                service.SERVICE_NAME, {m.name: answer(m.name) for m in service.METHODS}
            ),
        )
    )
    other_key = make_tls_identity().pem_key_and_certificate()  # the same name, another key
    port = impostor.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([other_key]))
    impostor.start()
    try:
        error = _error(lambda: _connect(server.url, api_key=key, transport="grpc", grpc_port=port))
        assert type(error) is blindinfer.KeyBindingError
        assert "did not present the attested TLS certificate" in str(error)
        assert isinstance(error.__cause__, grpc.RpcError)
        assert calls == []
    finally:
        impostor.stop(None)


def test_arguments_are_checked_before_anything_is_sent() -> None:
    """Against a port nobody listens on: a check made after connecting would fail there."""
    url = f"https://127.0.0.1:{_free_port()}"
    for options, words in (
        ({"transport": "GRPC"}, "unknown transport"),
        ({"transport": "grpc", "grpc_port": 0}, "grpc_port"),
        ({"transport": "grpc", "replicas": 2}, "replicas"),
        ({"grpc_port": 9930}, "transport='grpc' only"),
    ):
        error = _error(lambda options=options: _connect(url, **options))
        assert type(error) is blindinfer.UsageError
        assert isinstance(error, ValueError)
        assert words in str(error)
    error = _error(lambda: asyncio.run(_connect_async(url, transport="GRPC")))
    assert type(error) is blindinfer.UsageError
    assert "unknown transport" in str(error)


async def _connect_async(url: str, **options: Any) -> blindinfer.AsyncClient:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return await blindinfer.connect_async(url, policy=POLICY, simulation=True, **options)


def test_the_async_client_over_grpc(
    both: tuple[Any, Any], served: tuple[ServerProcess, int, str]
) -> None:
    https, _ = both
    server, _, key = served
    x = {"x": np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)}

    async def go() -> tuple[dict[str, np.ndarray], Any, BaseException]:
        client = await _connect_async(server.url, api_key=key, transport="grpc")
        async with client:
            assert client.transport == "grpc"
            outputs = await client.run_model("mlp", x)
            metadata = await client.model_metadata("mlp")
            try:
                await client.run_model("no-such-model", x)
            except blindinfer.BlindInferError as exc:
                return outputs, metadata, exc
        raise AssertionError("no error")

    outputs, metadata, error = asyncio.run(go())
    assert_bit_identical(outputs, in_process(MLP, x))
    assert metadata == https.model_metadata("mlp")
    assert str(error) == str(_error(https.run_model, "no-such-model", x))
    wrong = _error(
        lambda: asyncio.run(
            _connect_async(server.url, api_key=key, transport="grpc", grpc_port=_free_port())
        )
    )
    assert type(wrong) is blindinfer.ConnectionFailedError
