"""The attesting proxy with an unmodified Open Inference Protocol client (tritonclient).

Model metadata, inference with JSON and with binary tensors, repository load/unload: once
through the proxy (plain HTTP on loopback) and once directly against the server with
tritonclient's own TLS pinned to the attested certificate; outputs equal onnxruntime
in-process. Then the refusals: a policy that does not match (the upstream sees only
attestation connections), and an upstream that restarts with a new key, which the proxy
re-attests, and refuses if the new server fails the policy.

Between proxy and server sits a TCP relay: it counts connections, and switching its target
while dropping its connections is an upstream restart at the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import blindinfer
from blindinfer.cli.proxy import READY_PREFIX
from blindinfer.cli.proxy import main as proxy_main
from blindinfer.proxy.forward import STATUS_PATH, ProxyConfig, RunningProxy
from blindinfer.server.auth import generate_api_key
from blindinfer.server.config import ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support import onnx_models as zoo

from .conftest import policy_for

httpclient = pytest.importorskip("tritonclient.http")
triton_utils = pytest.importorskip("tritonclient.utils")

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::blindinfer.SimulationWarning")]

MODEL = zoo.model_bytes(zoo.multi_io_model())
OIP_TYPES = {"float32": "FP32", "int64": "INT64", "bool": "BOOL"}


# -- helpers -------------------------------------------------------------------------------


class TcpRelay:
    """A loopback TCP relay in its own thread; `retarget` + `drop` = a restarted upstream."""

    port: int
    url: str

    def __init__(self, target: str) -> None:
        self.target = _host_port(target)
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)
        assert self._server is not None
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.url = f"https://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        host, port = self.target
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}

    def retarget(self, url: str) -> None:
        self.target = _host_port(url)

    def drop(self) -> None:
        """Closes every relayed connection, as a restarting server does."""

        def close_all() -> None:
            for writer in list(self._writers):
                writer.close()

        self._loop.call_soon_threadsafe(close_all)
        time.sleep(0.2)

    def close(self) -> None:
        self.drop()

        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _host_port(url: str) -> tuple[str, int]:
    netloc = url.split("://", 1)[-1].rstrip("/")
    host, _, port = netloc.rpartition(":")
    return host.strip("[]"), int(port)


def in_process(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def triton_infer(
    client: Any, model: str, feed: dict[str, np.ndarray], *, binary: bool
) -> dict[str, np.ndarray]:
    inputs = []
    for name, array in feed.items():
        tensor = httpclient.InferInput(name, list(array.shape), OIP_TYPES[array.dtype.name])
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    names = ("logits", "ids_float", "masked_ids", "mask_count")
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in names]
    result = client.infer(model, inputs, outputs=outputs)
    return {name: result.as_numpy(name) for name in names}


def triton_load(client: Any, name: str) -> None:
    """tritonclient's load_model (it takes any status but 200 as an error, as Triton)."""
    client.load_model(name, files={"file:1/model.onnx": MODEL})


def assert_equal_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        value = np.asarray(got[name])
        assert value.dtype == expected.dtype, name
        assert value.shape == expected.shape, name
        assert value.tobytes() == expected.tobytes(), name


def pem_of(certificate_der: bytes) -> bytes:
    return x509.load_der_x509_certificate(certificate_der).public_bytes(serialization.Encoding.PEM)


def proxy_config(upstream: str, **overrides: Any) -> ProxyConfig:
    options: dict[str, Any] = {
        "upstream": upstream,
        "policy": policy_for(ServerConfig(simulation=True)),
        "simulation": True,
        **overrides,
    }
    return ProxyConfig(**options)


def hostport(url: str) -> str:
    return url.split("://", 1)[1]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(server: ServerProcess) -> Iterator[RunningProxy]:
    with RunningProxy(proxy_config(server.url)) as running:
        yield running


@pytest.fixture(scope="module")
def pinned_pem(
    server: ServerProcess, policy: blindinfer.Policy, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """What a user gets from `blindinfer attest`: the attested certificate, as a CA file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        verified = blindinfer.attest(server.url, policy=policy, simulation=True)
    path = tmp_path_factory.mktemp("pin") / "pinned.pem"
    path.write_bytes(pem_of(verified.certificate_der))
    return path


@pytest.fixture(params=["proxy", "direct"])
def triton(
    request: pytest.FixtureRequest, proxy: RunningProxy, server: ServerProcess, pinned_pem: Path
) -> Iterator[tuple[str, Any]]:
    if request.param == "proxy":
        client = httpclient.InferenceServerClient(hostport(proxy.url))
    else:
        # TLS verified against exactly the pinned certificate; `insecure` only skips the
        # host name check (the name is meaningless, the attested key is what is pinned).
        client = httpclient.InferenceServerClient(
            hostport(server.url), ssl=True, ssl_options={"ca_certs": str(pinned_pem)}, insecure=True
        )
    try:
        yield request.param, client
    finally:
        client.close()


# -- the protocol through the proxy and directly -------------------------------------------


def test_tritonclient_metadata_infer_load_unload(triton: tuple[str, Any]) -> None:
    route, client = triton
    name = f"multi-io-{route}"
    assert client.is_server_live()
    assert client.get_server_metadata()["name"] == "blindinfer"
    triton_load(client, name)
    try:
        assert client.is_model_ready(name)
        metadata = client.get_model_metadata(name)
        inputs = {t["name"]: t["datatype"] for t in metadata["inputs"]}
        assert inputs == {"features": "FP32", "ids": "INT64", "mask": "BOOL"}
        assert {t["name"] for t in metadata["outputs"]} == {
            "logits",
            "ids_float",
            "masked_ids",
            "mask_count",
        }
        index = client.get_model_repository_index()
        assert name in {entry["name"] for entry in index}
        for batch, binary in [(1, False), (5, False), (1, True), (33, True)]:
            feed = zoo.multi_io_feed(batch=batch, seed=batch)
            got = triton_infer(client, name, feed, binary=binary)
            assert_equal_outputs(got, in_process(feed))
    finally:
        client.unload_model(name)
    assert not client.is_model_ready(name)
    with pytest.raises(triton_utils.InferenceServerException) as refused:
        client.get_model_metadata(name)
    assert "unknown_model" in str(refused.value) or "404" in str(refused.value)


def test_direct_tls_with_another_pin_fails(server: ServerProcess, tmp_path: Path) -> None:
    """The direct route is really pinned: a different certificate as the CA is refused."""
    with start_server(["--simulation"]) as other, warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        verified = blindinfer.attest(
            other.url, policy=policy_for(ServerConfig(simulation=True)), simulation=True
        )
    wrong = tmp_path / "other.pem"
    wrong.write_bytes(pem_of(verified.certificate_der))
    client = httpclient.InferenceServerClient(
        hostport(server.url), ssl=True, ssl_options={"ca_certs": str(wrong)}, insecure=True
    )
    try:
        with pytest.raises(Exception, match=r"(?i)certificate|ssl"):
            client.get_server_metadata()
    finally:
        client.close()


def test_streamed_upload_and_headers(proxy: RunningProxy) -> None:
    """A chunked upload streams through; hop-by-hop headers do not leak either way."""

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(MODEL), 97):
            yield MODEL[start : start + 97]

    with httpx.Client(base_url=proxy.url) as local:
        response = local.put(
            "/v2/repository/models/streamed/upload",
            content=chunks(),
            headers={"content-type": "application/octet-stream", "x-drop": "1"},
        )
        assert response.status_code == 201, response.text
        assert (
            "transfer-encoding" not in response.headers
            or response.headers["transfer-encoding"] == "chunked"
        )
        assert local.delete("/v2/repository/models/streamed").status_code == 200
        status = local.get(STATUS_PATH).json()
    assert status["attested"] is True
    assert status["attestation"]["simulation"] is True


def test_request_body_limit(server: ServerProcess) -> None:
    with RunningProxy(proxy_config(server.url, max_request_bytes=1024)) as small:
        before = small.upstream.stats.forwarded
        with httpx.Client(base_url=small.url) as local:
            declared = local.put("/v2/repository/models/big/upload", content=b"x" * 2048)
            chunked = local.put(
                "/v2/repository/models/big/upload", content=iter([b"x" * 600, b"y" * 600])
            )
        assert declared.status_code == 413
        assert declared.json()["code"] == "payload_too_large"
        assert chunked.status_code == 413
        assert small.upstream.stats.forwarded == before  # the declared one never left


def test_api_key_added_by_the_proxy_never_taken_from_callers(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    key, sha = generate_api_key()
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    path.write_text(
        f'[[tenant]]\nname = "t"\n[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = "{sha}"\n'
    )
    with start_server(["--simulation", f"--auth-file={path}"]) as keyed:
        index = "/v2/repository/index"
        with RunningProxy(proxy_config(keyed.url, api_key=key)) as with_key:
            forged = {"authorization": "Bearer bik_forged"}
            assert httpx.post(with_key.url + index, headers=forged).status_code == 200
        with RunningProxy(proxy_config(keyed.url)) as without_key:
            caller = {"authorization": f"Bearer {key}"}
            assert httpx.post(without_key.url + index, headers=caller).status_code == 401
        with RunningProxy(proxy_config(keyed.url, forward_client_authorization=True)) as forwarding:
            assert httpx.post(forwarding.url + index, headers=caller).status_code == 200


# -- refusals ------------------------------------------------------------------------------


def test_policy_mismatch_forwards_nothing(server: ServerProcess) -> None:
    relay = TcpRelay(server.url)
    wrong = policy_for(ServerConfig(simulation=True, isvprodid=7))
    try:
        with RunningProxy(proxy_config(relay.url, policy=wrong, retry_seconds=0.0)) as refusing:
            client = httpclient.InferenceServerClient(hostport(refusing.url))
            try:
                with pytest.raises(triton_utils.InferenceServerException) as refused:
                    client.get_model_metadata("anything")
                assert "PolicyMismatchError" in str(refused.value)
                with pytest.raises(triton_utils.InferenceServerException):
                    client.load_model("m", files={"file:1/model.onnx": MODEL})
            finally:
                client.close()
            with httpx.Client(base_url=refusing.url) as local:
                for method, path, body in [
                    ("GET", "/v2", None),
                    ("GET", "/v2/health/ready", None),
                    ("POST", "/v2/models/x/infer", b'{"inputs": []}'),
                    ("PUT", "/v2/repository/models/m/upload", MODEL),
                    ("DELETE", "/v2/repository/models/m", None),
                ]:
                    response = local.request(method, path, content=body)
                    assert response.status_code == 502, (method, path)
                    document = response.json()
                    assert document["code"] == "attestation_failed"
                    assert document["attestation_error"] == "PolicyMismatchError"
                    assert "isvprodid" in document["message"]
            stats = refusing.upstream.stats
            assert stats.forwarded == 0
            assert stats.attestations == 0
            assert stats.new_connections == 0  # no pinned connection was ever opened
            # every TCP connection the upstream saw was one attestation (POST /v2/attestation)
            assert relay.connections == stats.attestation_failures >= 8
    finally:
        relay.close()


def test_upstream_restart_reattests_and_refuses_a_failing_one(server: ServerProcess) -> None:
    relay = TcpRelay(server.url)
    try:
        with (
            start_server(["--simulation"]) as restarted,
            start_server(["--simulation", "--isvsvn", "0"]) as downgraded,
            RunningProxy(proxy_config(relay.url, fresh_seconds=0.0)) as running,
        ):
            stats = running.upstream.stats
            with httpx.Client(base_url=running.url) as local:
                assert local.get("/v2").status_code == 200
                first = running.upstream.attestation
                assert first is not None
                attested = stats.attestations

                # same server, connection lost: the reconnect is attested again
                relay.drop()
                assert local.get("/v2/health/ready").status_code == 200
                assert stats.attestations == attested + 1
                assert stats.certificate_changes == 0

                # the upstream restarts with a new key: the pin refuses the handshake,
                # the proxy attests the new server, then forwards
                relay.retarget(restarted.url)
                relay.drop()
                client = httpclient.InferenceServerClient(hostport(running.url))
                try:
                    triton_load(client, "after-restart")
                    feed = zoo.multi_io_feed(batch=2)
                    got = triton_infer(client, "after-restart", feed, binary=True)
                    assert_equal_outputs(got, in_process(feed))
                finally:
                    client.close()
                second = running.upstream.attestation
                assert second is not None
                assert second.certificate_der != first.certificate_der
                assert stats.certificate_changes == 1

                # it restarts again as a server the policy refuses: nothing is forwarded
                forwarded = stats.forwarded
                relay.retarget(downgraded.url)
                relay.drop()
                for _ in range(3):
                    response = local.post(
                        "/v2/models/after-restart/infer", content=b'{"inputs": []}'
                    )
                    assert response.status_code == 502
                    assert response.json()["attestation_error"] == "PolicyMismatchError"
                    assert "isvsvn" in response.json()["message"]
                assert stats.forwarded == forwarded
                assert running.upstream.attestation is None
    finally:
        relay.close()


def test_periodic_reattestation(server: ServerProcess) -> None:
    with RunningProxy(proxy_config(server.url, reattest_seconds=0.3)) as running:
        time.sleep(1.2)
        assert running.upstream.stats.attestations >= 3
        assert httpx.get(running.url + "/v2").status_code == 200
        assert running.upstream.stats.certificate_changes == 0


def test_upstream_down_is_503_with_the_reason() -> None:
    relay = TcpRelay("https://127.0.0.1:9")  # nothing listens on the discard port
    try:
        with RunningProxy(proxy_config(relay.url)) as running:
            response = httpx.get(running.url + "/v2/health/live")
        assert response.status_code == 503
        document = response.json()
        assert document["code"] == "upstream_unavailable"
        assert document["attestation_error"]
        assert running.upstream.stats.forwarded == 0
    finally:
        relay.close()


# -- the command line ----------------------------------------------------------------------


def test_cli_refuses_a_remote_listen_address(capsys: pytest.CaptureFixture[str]) -> None:
    code = proxy_main(
        ["--policy", "p.toml", "--upstream", "https://127.0.0.1:1", "--listen", "0.0.0.0:8000"]
    )
    assert code == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_cli_proxy_process(server: ServerProcess, tmp_path: Path) -> None:
    policy = policy_for(ServerConfig(simulation=True))
    assert policy.sgx is not None
    toml = tmp_path / "policy.toml"
    toml.write_text(
        "[sgx]\n"
        f'mrenclave = ["{policy.sgx.mrenclave[0].hex()}"]\n'
        f'mrsigner = ["{policy.sgx.mrsigner[0].hex()}"]\n'
        "isvprodid = [1]\nmin_isvsvn = 1\n"
    )
    command = [
        sys.executable,
        "-m",
        "blindinfer.cli.proxy",
        "--policy",
        str(toml),
        "--upstream",
        server.url,
        "--listen",
        "127.0.0.1:0",
        "--simulation",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(READY_PREFIX), line
        assert "(attested)" in line
        url = line[len(READY_PREFIX) :].split(" ")[0]
        assert httpx.get(url + "/v2").json()["name"] == "blindinfer"
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
