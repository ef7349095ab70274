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
import stat
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


# -- no confused deputy: web pages, DNS rebinding, other local users -----------------------

EVIL_PAGE = "https://evil.example"


def policy_file(directory: Path) -> Path:
    """The policy TOML a user writes for the simulation server (as `blindinfer measure`)."""
    policy = policy_for(ServerConfig(simulation=True))
    assert policy.sgx is not None
    toml = directory / "policy.toml"
    toml.write_text(
        "[sgx]\n"
        f'mrenclave = ["{policy.sgx.mrenclave[0].hex()}"]\n'
        f'mrsigner = ["{policy.sgx.mrsigner[0].hex()}"]\n'
        "isvprodid = [1]\nmin_isvsvn = 1\n"
    )
    return toml


@contextlib.contextmanager
def proxy_process(upstream: str, directory: Path, *extra: str) -> Iterator[str]:
    """`blindinfer proxy` as its own process; yields what its ready line names."""
    command = [
        sys.executable,
        "-m",
        "blindinfer.cli.proxy",
        "--policy",
        str(policy_file(directory)),
        "--upstream",
        upstream,
        "--listen",
        "127.0.0.1:0",
        "--simulation",
        *extra,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(READY_PREFIX), line
        assert "(attested)" in line
        yield line[len(READY_PREFIX) :].split(" ")[0]
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """A server with two tenants: (its URL, alice's key, bob's key)."""
    alice, alice_sha = generate_api_key()
    bob, bob_sha = generate_api_key()
    path = tmp_path_factory.mktemp("tenants") / "auth.toml"
    path.write_text(
        f'[[tenant]]\nname = "alice"\n[[tenant.key]]\nid = "a"\nrole = "owner"\n'
        f'sha256 = "{alice_sha}"\n'
        f'[[tenant]]\nname = "bob"\n[[tenant.key]]\nid = "b"\nrole = "owner"\n'
        f'sha256 = "{bob_sha}"\n'
    )
    with start_server(["--simulation", f"--auth-file={path}"]) as keyed:
        yield keyed.url, alice, bob


@pytest.fixture(scope="module")
def alice_proxy(
    tenants: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The user's proxy, holding alice's API key (the deputy a page would like to use)."""
    url, alice, _ = tenants
    with proxy_process(url, tmp_path_factory.mktemp("alice"), "--api-key", alice) as local:
        yield local


def _tenant(tenants: tuple[str, str, str], key: str) -> blindinfer.Client:
    return blindinfer.connect(
        tenants[0], policy=policy_for(ServerConfig(simulation=True)), simulation=True, api_key=key
    )


def test_a_web_page_cannot_share_or_unload_through_the_proxy(
    tenants: tuple[str, str, str], alice_proxy: str
) -> None:
    """What a page sends with fetch(..., {method: "POST", mode: "no-cors", body}) or a form:
    no CORS preflight, the browser adds Origin and Sec-Fetch-Site. Before the fix the
    proxy forwarded it with alice's key: the private model was shared with every tenant
    and the other one unloaded."""
    _, alice_key, bob_key = tenants
    with _tenant(tenants, alice_key) as alice, _tenant(tenants, bob_key) as bob:
        alice.upload_model(MODEL, name="private")
        alice.upload_model(MODEL, name="loaded")
        attacks: list[tuple[dict[str, str], int, str]] = [
            (
                {
                    "origin": EVIL_PAGE,
                    "sec-fetch-site": "cross-site",
                    "sec-fetch-mode": "no-cors",
                    "content-type": "text/plain;charset=UTF-8",
                },
                403,
                "origin_not_allowed",
            ),
            (  # a form post
                {"origin": EVIL_PAGE, "content-type": "application/x-www-form-urlencoded"},
                403,
                "origin_not_allowed",
            ),
            # a Blob body: no Content-Type at all, only the browser's headers
            ({"origin": EVIL_PAGE, "sec-fetch-site": "cross-site"}, 403, "origin_not_allowed"),
            ({"origin": "null", "content-type": "text/plain"}, 403, "origin_not_allowed"),
            # a page on another port of localhost ("same-site")
            (
                {"origin": "http://localhost:3000", "sec-fetch-site": "same-site"},
                403,
                "origin_not_allowed",
            ),
            # a browser that leaves Origin out still says where the request comes from
            (
                {"sec-fetch-site": "cross-site", "content-type": "text/plain"},
                403,
                "cross_site_request",
            ),
            # and without any browser header the Content-Type alone is refused
            ({"content-type": "text/plain"}, 415, "unsupported_media_type"),
        ]
        with httpx.Client(base_url=alice_proxy) as local:
            for headers, status, code in attacks:
                share = local.post(
                    "/v2/repository/models/private/share",
                    content=b'{"tenants": ["*"]}',
                    headers=headers,
                )
                unload = local.post(
                    "/v2/repository/models/loaded/unload", content=b"{}", headers=headers
                )
                for response in (share, unload):
                    assert response.status_code == status, (headers, response.text)
                    assert response.json()["code"] == code
                    assert "access-control-allow-origin" not in response.headers
            assert "private" not in {m.name for m in bob.list_models()}
            models = {m.name: m for m in alice.list_models()}
            assert models["private"].shared_with == ()
            assert "loaded" in models
            # the control: a local program (tritonclient sends JSON without a Content-Type)
            done = local.post("/v2/repository/models/loaded/unload", content=b"{}")
            assert done.status_code == 200, done.text
        assert "loaded" not in {m.name for m in alice.list_models()}
        alice.delete_model("private")


def test_dns_rebinding_cannot_read_the_index_or_outputs(
    tenants: tuple[str, str, str], alice_proxy: str
) -> None:
    """After DNS rebinding the page is same-origin with the proxy, but its requests name
    the attacker's host: refused (421), for reading the index and for inference."""
    port = alice_proxy.rsplit(":", 1)[1]
    with _tenant(tenants, tenants[1]) as alice:
        alice.upload_model(MODEL, name="secret-name")
    feed = zoo.multi_io_feed(batch=1)
    infer = {
        "inputs": [
            {
                "name": name,
                "datatype": OIP_TYPES[array.dtype.name],
                "shape": list(array.shape),
                "data": array.flatten().tolist(),
            }
            for name, array in feed.items()
        ]
    }
    rebound = [f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}", "127.0.0.1:1"]
    try:
        with httpx.Client(base_url=alice_proxy) as local:
            for host in rebound:
                for response in (
                    local.get("/v2/repository/index", headers={"host": host}),
                    local.post("/v2/repository/index", headers={"host": host}),
                    local.post("/v2/models/secret-name/infer", json=infer, headers={"host": host}),
                    local.get("/v2/models/secret-name", headers={"host": host}),
                    local.get(STATUS_PATH, headers={"host": host}),
                ):
                    assert response.status_code == 421, (host, response.text)
                    assert response.json()["code"] == "host_not_allowed"
                    assert "secret-name" not in response.text
            # the proxy's own names work (the control)
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
                index = local.get("/v2/repository/index", headers={"host": host})
                assert index.status_code == 200, (host, index.text)
                assert "secret-name" in {m["name"] for m in index.json()}
            outputs = local.post("/v2/models/secret-name/infer", json=infer)
            assert outputs.status_code == 200, outputs.text
    finally:
        with _tenant(tenants, tenants[1]) as alice:
            alice.delete_model("secret-name")


def test_allowed_hosts_and_origins(server: ServerProcess, tmp_path: Path) -> None:
    trusted = "http://localhost:3000"
    with proxy_process(
        server.url,
        tmp_path,
        "--allow-host",
        "blindinfer.lan",
        "--allow-origin",
        trusted + "/",
    ) as url:
        port = url.rsplit(":", 1)[1]
        with httpx.Client(base_url=url) as local:
            assert local.get("/v2", headers={"host": f"blindinfer.lan:{port}"}).status_code == 200
            # without a port: the default 80, not where the proxy listens
            assert local.get("/v2", headers={"host": "blindinfer.lan"}).status_code == 421
            plain = local.get("/v2")
            assert plain.status_code == 200
            assert "access-control-allow-origin" not in plain.headers
            page = {"origin": trusted, "sec-fetch-site": "same-site"}
            allowed = local.post("/v2/repository/index", headers=page)
            assert allowed.status_code == 200, allowed.text
            assert allowed.headers["access-control-allow-origin"] == trusted
            assert (
                "inference-header-content-length"
                in allowed.headers["access-control-expose-headers"]
            )
            preflight = local.options(
                "/v2/repository/models/m/upload",
                headers={
                    **page,
                    "access-control-request-method": "PUT",
                    "access-control-request-headers": "content-type",
                },
            )
            assert preflight.status_code == 204
            assert "PUT" in preflight.headers["access-control-allow-methods"]
            assert preflight.headers["access-control-allow-origin"] == trusted
            # even from an allowed page, a body the route does not read is refused
            wrong = local.post(
                "/v2/repository/index", headers={**page, "content-type": "text/plain"}
            )
            assert wrong.status_code == 415
            assert wrong.json()["code"] == "unsupported_media_type"
            evil_preflight = local.options(
                "/v2/repository/index",
                headers={"origin": EVIL_PAGE, "access-control-request-method": "POST"},
            )
            assert evil_preflight.status_code == 403
            assert "access-control-allow-origin" not in evil_preflight.headers


def test_unix_socket_and_access_token(server: ServerProcess, tmp_path: Path) -> None:
    """For other local users: a 0600 Unix socket, and a token file (created 0600) whose
    token every request must carry; the token is never forwarded upstream."""
    sock = tmp_path / "proxy.sock"
    token_file = tmp_path / "token"
    with proxy_process(
        server.url,
        tmp_path,
        "--unix-socket",
        str(sock),
        "--access-token-file",
        str(token_file),
    ) as where:
        assert where == f"unix:{sock}"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://localhost") as local:
            missing = local.get("/v2")
            assert missing.status_code == 401
            assert missing.json()["code"] == "proxy_token_required"
            wrong = local.get("/v2", headers={"x-blindinfer-proxy-token": "x" * 43})
            assert wrong.status_code == 401
            good = local.get("/v2", headers={"x-blindinfer-proxy-token": token, "host": "anything"})
            assert good.status_code == 200, good.text
    assert not sock.exists()  # removed on exit


def test_access_token_on_tcp(server: ServerProcess) -> None:
    token = "t" * 40
    with (
        RunningProxy(proxy_config(server.url, access_token=token)) as guarded,
        httpx.Client(base_url=guarded.url) as local,
    ):
        assert local.get("/v2").status_code == 401
        before = guarded.upstream.stats.forwarded
        assert guarded.upstream.stats.refused_local >= 1
        response = local.get("/v2", headers={"x-blindinfer-proxy-token": token})
        assert response.status_code == 200
        assert guarded.upstream.stats.forwarded == before + 1
    # the dropped-header list is what keeps it from the upstream
    from blindinfer.proxy.forward import DROPPED_REQUEST

    assert b"x-blindinfer-proxy-token" in DROPPED_REQUEST


def test_cli_refuses_unusable_guard_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--policy", str(policy_file(tmp_path)), "--upstream", "https://127.0.0.1:1"]
    assert proxy_main([*base, "--allow-origin", "*"]) == 2
    assert "not an origin" in capsys.readouterr().err
    shared = tmp_path / "shared-token"
    shared.write_text("s" * 40)
    shared.chmod(0o644)
    assert proxy_main([*base, "--access-token-file", str(shared)]) == 2
    assert "chmod 600" in capsys.readouterr().err
