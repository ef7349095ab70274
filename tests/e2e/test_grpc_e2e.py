"""The OIP v2 gRPC API end to end: unmodified tritonclient.grpc against `serve --grpc-port`.

One simulation server for the module, with two tenants' keys. The client pins the
certificate that blindinfer's verifying client attested (TLS to the attested key), and
the answers must be bit-identical to onnxruntime in-process.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tritonclient.utils import InferenceServerException

import blindinfer
from blindinfer.client.receipts import certificate_public_key
from blindinfer.client.transport import pinned_context
from blindinfer.protocol.oip_grpc import oip_v2_pb2 as pb
from blindinfer.protocol.oip_grpc import service
from blindinfer.protocol.receipts import parse_and_verify_jws, tensor_digest
from blindinfer.server.auth import generate_api_key
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from blindinfer.server.tls import CERTIFICATE_COMMON_NAME, make_tls_identity
from e2e.conftest import policy_for
from support import onnx_models as zoo
from support.replicas import free_port
from support.tenants import owner_keys

pytestmark = pytest.mark.e2e

MAX_REQUEST_BYTES = 1 << 20
NAME_OVERRIDE = [("grpc.ssl_target_name_override", CERTIFICATE_COMMON_NAME)]


class Running:
    def __init__(
        self, server: ServerProcess, grpc_port: int, keys: dict[str, str], pem: Path, der: bytes
    ):
        self.server = server
        self.certificate_der = der
        self.target = f"127.0.0.1:{grpc_port}"
        self.grpc_port = grpc_port
        self.keys = keys
        self.pem = pem
        self.pem_bytes = pem.read_bytes()

    def headers(self, tenant: str = "a") -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[tenant]}"}

    def triton(self, pem: Path | None = None) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(
            self.target,
            ssl=True,
            root_certificates=str(pem or self.pem),
            channel_args=NAME_OVERRIDE,
        )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    folder = tmp_path_factory.mktemp("grpc")
    auth, keys = owner_keys(folder)
    admin_key, admin_sha = generate_api_key()  # reads /metrics
    keys["ops"] = admin_key
    auth.write_text(
        auth.read_text() + '[[tenant]]\nname = "ops"\n'
        f'[[tenant.key]]\nid = "ops-key"\nrole = "admin"\nsha256 = "{admin_sha}"\n'
    )
    port = free_port()
    args = [
        "--simulation",
        f"--auth-file={auth}",
        f"--grpc-port={port}",
        f"--max-request-bytes={MAX_REQUEST_BYTES}",
    ]
    with start_server(args) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(
                server.url,
                policy=policy_for(
                    ServerConfig(
                        simulation=True, limits=Limits(max_request_bytes=MAX_REQUEST_BYTES)
                    )
                ),
                simulation=True,
                api_key=keys["a"],
            )
        with client:
            der = client.attestation.certificate_der
            pem = folder / "attested.pem"
            pem.write_bytes(
                x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
            )
            with httpx.Client(base_url=server.url, verify=pinned_context(der)) as rest:
                assert rest.get("/v2").json()["grpc_port"] == port
        yield Running(server, port, keys, pem, der)


def in_process(model: bytes, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def infer_inputs(feed: dict[str, np.ndarray]) -> list[triton.InferInput]:
    inputs = []
    for name, array in feed.items():
        tensor = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)  # raw_input_contents: tritonclient's binary path
        inputs.append(tensor)
    return inputs


def error_of(call: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_health_and_server_metadata(running: Running) -> None:
    client = running.triton()
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "blindinfer"
    assert metadata.version == blindinfer.__version__
    assert list(metadata.extensions) == ["binary_tensor_data", "model_repository", "attestation"]


def test_load_infer_unload(running: Running) -> None:
    client = running.triton()
    headers = running.headers()
    model = zoo.model_bytes(zoo.multi_io_model())
    client.load_model("multi-io", config="{}", files={"file:1/model.onnx": model}, headers=headers)
    assert client.is_model_ready("multi-io", headers=headers)
    client.load_model("multi-io", headers=headers)  # no file: an existing model is loaded
    metadata = client.get_model_metadata("multi-io", headers=headers)
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("features", "FP32", [-1, 4]),
        ("ids", "INT64", [-1]),
        ("mask", "BOOL", [-1]),
    ]
    feed = zoo.multi_io_feed(batch=5)
    want = in_process(model, feed)
    result = client.infer("multi-io", infer_inputs(feed), headers=headers)
    for name, expected in want.items():
        got = result.as_numpy(name)
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), name
        assert got.tobytes() == expected.tobytes(), name
    # requested outputs are honoured, in the order asked
    asked = [triton.InferRequestedOutput("mask_count"), triton.InferRequestedOutput("logits")]
    result = client.infer("multi-io", infer_inputs(feed), outputs=asked, headers=headers)
    assert [o.name for o in result.get_response().outputs] == ["mask_count", "logits"]
    assert result.as_numpy("logits").tobytes() == want["logits"].tobytes()
    # another tenant sees nothing, the same way as for a missing model
    error = error_of(lambda: client.get_model_metadata("multi-io", headers=running.headers("b")))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "unknown_model" in error.message()
    client.unload_model("multi-io", headers=headers)  # REST's unload: deleted
    error = error_of(lambda: client.infer("multi-io", infer_inputs(feed), headers=headers))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert not client.is_model_ready("multi-io", headers=headers)


def test_wrong_key_is_unauthenticated_and_runs_nothing(running: Running) -> None:
    client = running.triton()
    model = zoo.model_bytes(zoo.mlp_model(in_features=4, hidden=8, out_features=3))
    wrong = {"authorization": "Bearer bik_" + "A" * 43}
    error = error_of(
        lambda: client.load_model("never", config="{}", files={"file:m.onnx": model}, headers=wrong)
    )
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    assert error.message().startswith("unauthorized: ")
    error = error_of(lambda: client.get_model_metadata("never"))  # no key at all
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    error = error_of(lambda: client.get_model_metadata("never", headers=running.headers()))
    assert error.status() == "StatusCode.NOT_FOUND"  # nothing was stored


def test_request_size_limits(running: Running) -> None:
    client = running.triton()
    headers = running.headers()
    model = zoo.model_bytes(zoo.mlp_model(in_features=4, hidden=8, out_features=3))
    client.load_model("small", config="{}", files={"file:1/model.onnx": model}, headers=headers)
    try:
        # under the limit, above the size parsed off the listener's loop: runs
        x = np.random.default_rng(1).standard_normal((40_000, 4)).astype(np.float32)
        result = client.infer("small", infer_inputs({"x": x}), headers=headers)
        want = in_process(model, {"x": x})["probabilities"]
        assert result.as_numpy("probabilities").tobytes() == want.tobytes()
        # a shape beyond the request limit, refused from its header (no data needed)
        huge = triton.InferInput("x", [1 << 20, 4], "FP32")
        error = error_of(lambda: client.infer("small", [huge], headers=headers))
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert error.message().startswith("tensor_too_large: ")
        # a message beyond --max-request-bytes
        big = np.zeros((MAX_REQUEST_BYTES // 16 + 1, 4), dtype=np.float32)
        error = error_of(lambda: client.infer("small", infer_inputs({"x": big}), headers=headers))
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert error.message().startswith("payload_too_large: ")
    finally:
        client.unload_model("small", headers=headers)


def test_garbage_bytes_are_invalid_argument_and_the_server_goes_on(running: Running) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=running.pem_bytes)
    with grpc.secure_channel(running.target, credentials, options=NAME_OVERRIDE) as channel:
        call = channel.unary_unary(service.MODEL_INFER.path)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff\xff garbage", metadata=tuple(running.headers().items()))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailing = dict(caught.value.trailing_metadata())
        assert trailing["blindinfer-error-code"] == "invalid_request"
        live = channel.unary_unary(
            service.SERVER_LIVE.path,
            request_serializer=service.SERVER_LIVE.request.SerializeToString,
            response_deserializer=service.SERVER_LIVE.response.FromString,
        )
        assert live(service.SERVER_LIVE.request()).live
    assert running.triton().is_server_live()


def test_typed_contents_and_a_receipt_signed_by_the_attested_key(running: Running) -> None:
    """A raw channel with our own messages: inputs as typed `contents` (tritonclient only
    sends raw ones) and a receipt that verifies with the attested certificate's key."""
    headers = running.headers()
    model = zoo.model_bytes(zoo.mlp_model(in_features=4, hidden=8, out_features=3))
    running.triton().load_model(
        "receipted", config="{}", files={"file:1/model.onnx": model}, headers=headers
    )
    x = (np.arange(8, dtype=np.float32).reshape(2, 4) - 3) / 7
    request = pb.ModelInferRequest(model_name="receipted", id="r-1")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    request.parameters["receipt"].bool_param = True
    credentials = grpc.ssl_channel_credentials(root_certificates=running.pem_bytes)
    try:
        with grpc.secure_channel(running.target, credentials, options=NAME_OVERRIDE) as channel:
            infer = channel.unary_unary(
                service.MODEL_INFER.path,
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            response = infer(request, metadata=tuple(headers.items()))
    finally:
        running.triton().unload_model("receipted", headers=headers)
    (output,) = response.outputs
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(output.shape))
    want = in_process(model, {"x": x})["probabilities"]
    assert got.tobytes() == want.tobytes()
    jws = json.loads(response.parameters["receipt"].string_param)
    payload = parse_and_verify_jws(jws, certificate_public_key(running.certificate_der))
    assert payload["kind"] == "inference"
    assert payload["request_id"] == "r-1"
    assert payload["inputs_digest"] == tensor_digest({"x": x})
    assert payload["outputs_digest"] == tensor_digest({"probabilities": want})


def _other_certificate(path: Path) -> Path:
    """A self-signed certificate with the server's name but another key."""
    path.write_bytes(make_tls_identity().pem_key_and_certificate()[1])
    return path


def test_a_client_pinning_another_certificate_gets_nothing(
    running: Running, tmp_path: Path
) -> None:
    client = running.triton(_other_certificate(tmp_path / "other.pem"))
    error = error_of(lambda: client.get_server_metadata())
    assert error.status() == "StatusCode.UNAVAILABLE"


def test_calls_are_counted_in_metrics_by_method_and_status(running: Running) -> None:
    """/metrics counts gRPC calls by method and status code, never by model name."""

    def count(method: str, code: str) -> float:
        with httpx.Client(
            base_url=running.server.url, verify=pinned_context(running.certificate_der)
        ) as rest:
            answer = rest.get(
                "/metrics", headers={"authorization": f"Bearer {running.keys['ops']}"}
            )
        assert answer.status_code == 200
        wanted = f'blindinfer_grpc_calls_total{{code="{code}",method="{method}"}} '
        lines = [line for line in answer.text.splitlines() if line.startswith(wanted)]
        return float(lines[0].split(" ")[1]) if lines else 0.0

    live, missing = count("ServerLive", "OK"), count("ModelMetadata", "NOT_FOUND")
    client = running.triton()
    assert client.is_server_live()
    error_of(lambda: client.get_model_metadata("no-such-model", headers=running.headers()))
    assert count("ServerLive", "OK") == live + 1
    assert count("ModelMetadata", "NOT_FOUND") == missing + 1
