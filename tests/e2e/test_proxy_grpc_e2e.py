"""The attesting proxy's gRPC side with an unmodified `tritonclient.grpc`.

Plaintext gRPC to the proxy on loopback; the proxy forwards over TLS pinned to the
attested certificate to the server's gRPC port (`serve --grpc-port`), found from its
`GET /v2`. Metadata, binary inference (equal to onnxruntime in-process, byte for byte) and
repository load/unload; the API key and the access token; then the refusals: a policy the
server does not meet (no gRPC connection reaches it), and a server that restarts with a
new key (the proxy re-attests, re-pins, and refuses a new server that fails the policy).

Between proxy and server, where a test needs it, sit TCP relays (test_proxy_e2e.TcpRelay):
they count connections, and retargeting them while dropping their connections is an
upstream restart at the same address.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from blindinfer.cli.proxy import READY_GRPC_PREFIX, READY_PREFIX
from blindinfer.proxy.forward import ProxyConfig, RunningProxy
from blindinfer.proxy.guard import TOKEN_HEADER
from blindinfer.server.auth import generate_api_key
from blindinfer.server.config import ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support import onnx_models as zoo

from .conftest import policy_for
from .test_proxy_e2e import TcpRelay

grpcclient = pytest.importorskip("tritonclient.grpc")
triton_utils = pytest.importorskip("tritonclient.utils")

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::blindinfer.SimulationWarning")]

MODEL = zoo.model_bytes(zoo.multi_io_model())
OIP_TYPES = {"float32": "FP32", "int64": "INT64", "bool": "BOOL"}
OUTPUTS = ("logits", "ids_float", "masked_ids", "mask_count")
TOKEN = "the-proxys-local-access-token"


# -- helpers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_grpc_server(*args: str) -> tuple[ServerProcess, int]:
    port = free_port()
    return start_server(["--simulation", "--grpc-port", str(port), *args]), port


def proxy_config(upstream: str, **overrides: Any) -> ProxyConfig:
    options: dict[str, Any] = {
        "upstream": upstream,
        "policy": policy_for(ServerConfig(simulation=True)),
        "simulation": True,
        "grpc_listen": ("127.0.0.1", 0),
        **overrides,
    }
    return ProxyConfig(**options)


def triton(proxy: RunningProxy) -> Any:
    """An unmodified tritonclient.grpc, plaintext to the proxy."""
    return grpcclient.InferenceServerClient(f"127.0.0.1:{proxy.grpc_port}")


def in_process(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def triton_infer(client: Any, model: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = []
    for name, array in feed.items():
        tensor = grpcclient.InferInput(name, list(array.shape), OIP_TYPES[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
    result = client.infer(model, inputs, outputs=outputs)
    return {name: result.as_numpy(name) for name in OUTPUTS}


def assert_equal_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        value = np.asarray(got[name])
        assert value.dtype == expected.dtype, name
        assert value.shape == expected.shape, name
        assert value.tobytes() == expected.tobytes(), name


def refused(call: Any) -> Any:
    """The InferenceServerException a call through the proxy raised."""
    with pytest.raises(triton_utils.InferenceServerException) as failed:
        call()
    return failed.value


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[tuple[ServerProcess, int]]:
    server, port = start_grpc_server()
    with server:
        yield server, port


@pytest.fixture(scope="module")
def proxy(grpc_server: tuple[ServerProcess, int]) -> Iterator[RunningProxy]:
    with RunningProxy(proxy_config(grpc_server[0].url)) as running:  # port from GET /v2
        yield running


# -- the protocol through the proxy --------------------------------------------------------


def test_tritonclient_grpc_metadata_infer_load_unload(proxy: RunningProxy) -> None:
    client = triton(proxy)
    name = "multi-io-grpc"
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.get_server_metadata().name == "blindinfer"
        client.load_model(name, files={"file:1/model.onnx": MODEL})
        try:
            assert client.is_model_ready(name)
            metadata = client.get_model_metadata(name)
            inputs = {t.name: t.datatype for t in metadata.inputs}
            assert inputs == {"features": "FP32", "ids": "INT64", "mask": "BOOL"}
            assert {t.name for t in metadata.outputs} == set(OUTPUTS)
            for batch in (1, 33):
                feed = zoo.multi_io_feed(batch=batch, seed=batch)
                assert_equal_outputs(triton_infer(client, name, feed), in_process(feed))
        finally:
            client.unload_model(name)
        assert not client.is_model_ready(name)
        error = refused(lambda: client.get_model_metadata(name))
        assert error.status() == "StatusCode.NOT_FOUND"
        assert "unknown_model" in error.message()
        # the upstream's own refusals pass through with their code
        error = refused(lambda: client.infer(name, []))
        assert error.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")
    finally:
        client.close()
    stats = proxy.upstream.stats
    assert stats.refused == 0
    assert stats.forwarded == 12  # every call above, the refused ones too


@pytest.mark.slow  # starts servers of its own
def test_the_access_token_and_the_api_key(
    grpc_server: tuple[ServerProcess, int], tmp_path: Path
) -> None:
    key, sha = generate_api_key()
    with ExitStack() as stack:
        auth = tmp_path / "auth.toml"
        auth.write_text(
            f'[[tenant]]\nname = "t"\n[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = "{sha}"\n'
        )
        keyed, _ = start_grpc_server(f"--auth-file={auth}")
        stack.enter_context(keyed)
        with_token = stack.enter_context(
            RunningProxy(proxy_config(grpc_server[0].url, access_token=TOKEN))
        )
        with_key = stack.enter_context(RunningProxy(proxy_config(keyed.url, api_key=key)))
        without_key = stack.enter_context(RunningProxy(proxy_config(keyed.url)))
        forwarding = stack.enter_context(
            RunningProxy(proxy_config(keyed.url, forward_client_authorization=True))
        )
        clients = [triton(p) for p in (with_token, with_key, without_key, forwarding)]
        for client in clients:
            stack.callback(client.close)
        token_client, key_client, keyless_client, forwarding_client = clients

        error = refused(token_client.get_server_metadata)
        assert error.status() == "StatusCode.UNAUTHENTICATED"
        assert TOKEN_HEADER in error.message()
        assert with_token.upstream.stats.forwarded == 0
        metadata = token_client.get_server_metadata(headers={TOKEN_HEADER: TOKEN})
        assert metadata.name == "blindinfer"

        def status(client: Any, headers: dict[str, str]) -> str:
            """What a keyed call answers: NOT_FOUND (no such model) once authenticated."""
            return str(refused(lambda: client.get_model_metadata("nope", headers=headers)).status())

        forged = {"authorization": "Bearer bik_forged"}
        caller = {"authorization": f"Bearer {key}"}
        # the proxy's key replaces whatever the caller sends
        assert status(key_client, forged) == "StatusCode.NOT_FOUND"
        # without a key of its own the proxy drops the caller's
        assert status(keyless_client, caller) == "StatusCode.UNAUTHENTICATED"
        # ... unless told to pass it on
        assert status(forwarding_client, caller) == "StatusCode.NOT_FOUND"
        assert status(forwarding_client, forged) == "StatusCode.UNAUTHENTICATED"


# -- refusals ------------------------------------------------------------------------------


def test_policy_mismatch_forwards_nothing(grpc_server: tuple[ServerProcess, int]) -> None:
    server, grpc_port = grpc_server
    relay = TcpRelay(f"grpc://127.0.0.1:{grpc_port}")  # counts gRPC connections
    wrong = policy_for(ServerConfig(simulation=True, isvprodid=7))
    config = proxy_config(
        server.url, policy=wrong, retry_seconds=0.0, upstream_grpc_port=relay.port
    )
    try:
        with RunningProxy(config) as refusing:
            client = triton(refusing)
            try:
                for call in (
                    client.is_server_live,
                    lambda: client.load_model("never-loaded", files={"file:1/model.onnx": MODEL}),
                    lambda: triton_infer(client, "never-loaded", zoo.multi_io_feed(batch=1)),
                ):
                    error = refused(call)
                    assert error.status() == "StatusCode.FAILED_PRECONDITION"
                    assert error.message().startswith("attestation_failed: the upstream ")
                    assert "nothing was forwarded: PolicyMismatchError" in error.message()
                    assert "isvprodid" in error.message()
            finally:
                client.close()
            stats = refusing.upstream.stats
            assert stats.forwarded == 0
            assert stats.attestations == 0
            assert stats.refused == 3
            assert refusing.app.grpc is not None
            assert refusing.app.grpc.forwarder.channel.pin is None
        assert relay.connections == 0  # not one gRPC connection reached the server
    finally:
        relay.close()


@pytest.mark.slow  # starts servers of its own
def test_upstream_restart_repins_and_refuses_a_failing_one(
    grpc_server: tuple[ServerProcess, int],
) -> None:
    server, grpc_port = grpc_server
    rest = TcpRelay(server.url)
    grpc_relay = TcpRelay(f"grpc://127.0.0.1:{grpc_port}")
    try:
        restarted, restarted_grpc = start_grpc_server()
        downgraded, downgraded_grpc = start_grpc_server("--isvsvn", "0")
        config = proxy_config(rest.url, upstream_grpc_port=grpc_relay.port, retry_seconds=0.0)
        with restarted, downgraded, RunningProxy(config) as running:
            stats = running.upstream.stats
            forwarder = running.app.grpc
            assert forwarder is not None
            client = triton(running)
            try:
                assert client.is_server_live()
                first = forwarder.forwarder.channel.pin
                assert first is not None

                # the upstream restarts with a new key: the old pin refuses its handshake,
                # the proxy attests the new server, pins its key and retries the call
                rest.retarget(restarted.url)
                grpc_relay.retarget(f"grpc://127.0.0.1:{restarted_grpc}")
                rest.drop()
                grpc_relay.drop()
                client.load_model("after-restart", files={"file:1/model.onnx": MODEL})
                feed = zoo.multi_io_feed(batch=3)
                got = triton_infer(client, "after-restart", feed)
                assert_equal_outputs(got, in_process(feed))
                second = forwarder.forwarder.channel.pin
                assert second is not None
                assert second != first
                assert stats.certificate_changes == 1

                # it restarts again as a server the policy refuses: nothing is forwarded
                forwarded = stats.forwarded
                rest.retarget(downgraded.url)
                grpc_relay.retarget(f"grpc://127.0.0.1:{downgraded_grpc}")
                rest.drop()
                grpc_relay.drop()
                connections = grpc_relay.connections
                for _ in range(3):
                    error = refused(lambda: triton_infer(client, "after-restart", feed))
                    assert error.status() == "StatusCode.FAILED_PRECONDITION", error.message()
                    assert "PolicyMismatchError" in error.message()
                    assert "isvsvn" in error.message()
                assert stats.forwarded == forwarded
                assert forwarder.forwarder.channel.pin is None  # the old pin is gone
                # at most the one connection whose handshake the old pin refused
                assert grpc_relay.connections <= connections + 1
            finally:
                client.close()
    finally:
        rest.close()
        grpc_relay.close()


def test_the_cli_prints_where_grpc_listens(
    grpc_server: tuple[ServerProcess, int], tmp_path: Path
) -> None:
    """`blindinfer proxy --grpc-listen`: its ready lines name both listeners."""
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
        grpc_server[0].url,
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        f"127.0.0.1:{free_port()}",
        "--simulation",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(READY_PREFIX)
        line = process.stdout.readline()
        assert line.startswith(READY_GRPC_PREFIX), line
        address = line[len(READY_GRPC_PREFIX) :].split(" ")[0]
        client = grpcclient.InferenceServerClient(address)
        try:
            assert client.is_server_live()
        finally:
            client.close()
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
