"""The ASGI app in-process (no sockets): every route, every error as {"error", "code"} with
its exact status, limits enforced while streaming, Triton's load form, OIP inference, the
evidence endpoint, and a fuzzed infer endpoint that never answers 500."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from starlette.testclient import TestClient

import blindinfer
from blindinfer.attestation.intel.sgx_quote import parse_sgx_quote
from blindinfer.attestation.verifier import verify_evidence
from blindinfer.protocol.evidence import parse_evidence_document
from blindinfer.server.app import build_state, create_app
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.tls import make_tls_identity
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER, SimulationPlatform

MRE = bytes(range(32))
MAX_MODEL = 1024
MAX_REQUEST = 4096
IDENTITY = make_tls_identity()


def _model(factor: float, doc: str = "") -> bytes:
    """x: FP32 [n, 2] -> y = x * factor (FP32), i: INT32 [3] -> j = -i (INT32)."""
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["f"], value_float=factor),
            helper.make_node("Mul", ["x", "f"], ["y"]),
            helper.make_node("Neg", ["i"], ["j"]),
        ],
        "api",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2]),
            helper.make_tensor_value_info("i", TensorProto.INT32, [3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2]),
            helper.make_tensor_value_info("j", TensorProto.INT32, [3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=doc)
    model.ir_version = 8
    return bytes(model.SerializeToString())


MODEL = _model(2.0)
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
OTHER = _model(3.0)
THIRD = _model(4.0)
FOURTH = _model(5.0)
assert len(FOURTH) < MAX_MODEL

JSON_REQUEST = {
    "id": "req-1",
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1.5, -2.0, 3.25, 0.0]},
        {"name": "i", "datatype": "INT32", "shape": [3], "data": [1, -2, 2147483647]},
    ],
}


def _client() -> TestClient:
    config = ServerConfig(
        simulation=True,
        limits=Limits(max_model_bytes=MAX_MODEL, max_request_bytes=MAX_REQUEST, max_models=3),
    )
    state = build_state(config, SimulationPlatform(MRE, isvprodid=4, isvsvn=6), IDENTITY)
    return TestClient(create_app(state), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with _client() as c:
        yield c


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "code"}, body
    assert body["code"] == code, body
    assert isinstance(body["error"], str)
    assert body["error"]
    return str(body["error"])


def _upload(client: TestClient, name: str, data: bytes = MODEL) -> Any:
    return client.put(f"/v2/repository/models/{name}/upload", content=data)


# ----------------------------------------------------------------------------- server


def test_server_metadata(client: TestClient) -> None:
    response = client.get("/v2")
    assert response.status_code == 200
    assert response.json() == {
        "name": "blindinfer",
        "version": blindinfer.__version__,
        "extensions": ["binary_tensor_data", "model_repository", "attestation"],
    }


def test_health(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}


def test_unknown_route(client: TestClient) -> None:
    _error(client.get("/v3/nothing"), 404, "not_found")
    _error(client.get("/"), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/m/infer"),
        ("POST", "/v2/health/ready"),
        ("DELETE", "/v2"),
        ("GET", "/v2/repository/models/m/upload"),
        ("PUT", "/v2/attestation"),
    ],
)
def test_wrong_method(client: TestClient, method: str, path: str) -> None:
    _error(client.request(method, path), 405, "method_not_allowed")


# ----------------------------------------------------------------------------- repository


def test_upload_returns_201_then_idempotent_200(client: TestClient) -> None:
    first = _upload(client, "double")
    assert first.status_code == 201
    body = first.json()
    assert body["sha256"] == MODEL_SHA
    assert body["model_id"].startswith("m-")
    assert len(body["model_id"]) == 34
    assert body == {
        "name": "double",
        "model_id": body["model_id"],
        "sha256": MODEL_SHA,
        "size": len(MODEL),
        "kind": "tensor",
        "owner": "local",
        "shared_with": [],
        "version": "1",
        "state": "READY",
        "reason": "",
        "created": True,
    }
    again = client.post("/v2/repository/models/double/upload", content=MODEL)
    assert again.status_code == 200
    assert again.json() == {**body, "created": False}


def test_anonymous_upload_is_named_after_its_model_id(client: TestClient) -> None:
    response = _upload(client, "_")
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == body["model_id"]
    assert client.get(f"/v2/models/{body['model_id']}").json()["name"] == body["model_id"]


def test_resolution_by_name_id_and_sha(client: TestClient) -> None:
    model_id = _upload(client, "double").json()["model_id"]
    for ref in ("double", model_id, MODEL_SHA):
        response = client.get(f"/v2/models/{ref}")
        assert response.status_code == 200
        assert response.json()["name"] == "double"
        assert client.get(f"/v2/models/{ref}/ready").json() == {"name": ref, "ready": True}


def test_model_metadata(client: TestClient) -> None:
    model_id = _upload(client, "double").json()["model_id"]
    expected = {
        "name": "double",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "i", "datatype": "INT32", "shape": [3]},
        ],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "j", "datatype": "INT32", "shape": [3]},
        ],
        "parameters": {
            "model_id": model_id,
            "sha256": MODEL_SHA,
            "size": len(MODEL),
            "kind": "tensor",
            "owner": "local",
        },
    }
    assert client.get("/v2/models/double").json() == expected
    assert client.get("/v2/models/double/versions/1").json() == expected
    _error(client.get("/v2/models/double/versions/2"), 404, "unknown_model")


def test_repository_index(client: TestClient) -> None:
    assert client.post("/v2/repository/index").json() == []
    a = _upload(client, "a").json()
    b = _upload(client, "b", OTHER).json()
    index = client.get("/v2/repository/index").json()
    assert [(m["name"], m["model_id"], m["state"]) for m in index] == [
        ("a", a["model_id"], "READY"),
        ("b", b["model_id"], "READY"),
    ]


def test_unknown_model(client: TestClient) -> None:
    _error(client.get("/v2/models/nothing"), 404, "unknown_model")
    _error(client.get("/v2/models/nothing/ready"), 404, "unknown_model")
    _error(client.post("/v2/models/nothing/infer", json=JSON_REQUEST), 404, "unknown_model")
    _error(client.delete("/v2/repository/models/nothing"), 404, "unknown_model")
    _error(client.post("/v2/repository/models/nothing/unload"), 404, "unknown_model")
    _error(client.post("/v2/repository/models/nothing/load"), 404, "unknown_model")


def test_invalid_onnx_upload(client: TestClient) -> None:
    _error(_upload(client, "bad", b"definitely not onnx"), 400, "invalid_model")
    _error(_upload(client, "empty", b""), 400, "invalid_model")
    assert client.get("/v2/repository/index").json() == []


def test_invalid_model_name(client: TestClient) -> None:
    _error(_upload(client, "a" * 64), 400, "invalid_model_name")
    _error(_upload(client, "m-" + "0" * 32), 400, "invalid_model_name")
    _error(_upload(client, ".hidden"), 400, "invalid_model_name")


def test_model_over_max_model_bytes(client: TestClient) -> None:
    _error(_upload(client, "big", b"\x00" * (MAX_MODEL + 1)), 413, "payload_too_large")
    assert client.get("/v2/repository/index").json() == []


def test_model_over_max_model_bytes_with_lying_content_length(client: TestClient) -> None:
    response = client.put(
        "/v2/repository/models/big/upload",
        content=b"\x00" * (3 * MAX_MODEL),
        headers={"content-length": "10"},
    )
    _error(response, 413, "payload_too_large")


def test_model_over_max_model_bytes_without_content_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b"\x00" * 256

    response = client.put("/v2/repository/models/big/upload", content=chunks())
    assert "content-length" not in response.request.headers
    _error(response, 413, "payload_too_large")


def test_bad_content_length(client: TestClient) -> None:
    response = client.put(
        "/v2/repository/models/m/upload", content=MODEL, headers={"content-length": "-5"}
    )
    _error(response, 400, "invalid_header")


def test_model_of_exactly_max_model_bytes_is_read(client: TestClient) -> None:
    # At the limit the body is read and judged on content (not ONNX here), not on size.
    _error(_upload(client, "edge", b"\x00" * MAX_MODEL), 400, "invalid_model")


def test_store_full_and_conflict(client: TestClient) -> None:
    assert _upload(client, "a", MODEL).status_code == 201
    assert _upload(client, "b", OTHER).status_code == 201
    assert _upload(client, "c", THIRD).status_code == 201
    _error(_upload(client, "d", FOURTH), 507, "store_full")
    _error(_upload(client, "a", OTHER), 409, "model_name_conflict")
    assert _upload(client, "a", MODEL).status_code == 200  # idempotent, even when full
    assert client.delete("/v2/repository/models/b").json()["state"] == "DELETED"
    assert _upload(client, "d", FOURTH).status_code == 201


def test_name_conflict(client: TestClient) -> None:
    assert _upload(client, "m", MODEL).status_code == 201
    message = _error(_upload(client, "m", OTHER), 409, "model_name_conflict")
    assert "'m'" in message
    assert client.get("/v2/models/m").json()["parameters"]["sha256"] == MODEL_SHA


def test_triton_load_and_unload(client: TestClient) -> None:
    payload = {"parameters": {"file:1/model.onnx": base64.b64encode(MODEL).decode()}}
    loaded = client.post("/v2/repository/models/tri/load", json=payload)
    assert loaded.status_code == 200  # as Triton; "created" says whether it is new
    body = loaded.json()
    assert (body["name"], body["sha256"], body["size"], body["created"]) == (
        "tri",
        MODEL_SHA,
        len(MODEL),
        True,
    )
    again = client.post("/v2/repository/models/tri/load", json=payload)
    assert again.status_code == 200
    assert again.json()["created"] is False
    # Without a file, load only confirms an existing model.
    confirm = client.post("/v2/repository/models/tri/load", json={})
    assert confirm.status_code == 200
    assert confirm.json()["model_id"] == body["model_id"]
    assert client.post("/v2/models/tri/infer", json=JSON_REQUEST).status_code == 200
    unloaded = client.post("/v2/repository/models/tri/unload")
    assert unloaded.status_code == 200
    assert unloaded.json()["state"] == "DELETED"
    assert unloaded.json()["model_id"] == body["model_id"]
    _error(client.get("/v2/models/tri"), 404, "unknown_model")
    _error(client.post("/v2/models/tri/infer", json=JSON_REQUEST), 404, "unknown_model")
    assert client.get("/v2/repository/index").json() == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{", 400, "malformed_json"),
        (b'{"parameters": []}', 400, "malformed_json"),
        (b"[]", 400, "malformed_json"),
        (b'{"parameters": {"file:1/model.onnx": 5}}', 400, "invalid_parameter"),
        (b'{"parameters": {"file:1/model.onnx": "!!!"}}', 400, "invalid_parameter"),
        (b'{"parameters": {"file:1/model.onnx": "aGVsbG8="}}', 400, "invalid_model"),
    ],
)
def test_triton_load_errors(client: TestClient, body: bytes, status: int, code: str) -> None:
    _error(client.post("/v2/repository/models/tri/load", content=body), status, code)


def test_triton_load_over_max_model_bytes(client: TestClient) -> None:
    data = b"\x00" * (MAX_MODEL + 1)  # its base64 still fits max_request_bytes
    payload = json.dumps({"parameters": {"file:1/model.onnx": base64.b64encode(data).decode()}})
    assert len(payload) < MAX_REQUEST
    _error(client.post("/v2/repository/models/tri/load", content=payload), 413, "payload_too_large")


def test_triton_load_over_max_request_bytes(client: TestClient) -> None:
    _error(
        client.post("/v2/repository/models/tri/load", content=b" " * (MAX_REQUEST + 1)),
        413,
        "payload_too_large",
    )


def test_delete_by_id_and_sha(client: TestClient) -> None:
    a = _upload(client, "a").json()
    b = _upload(client, "b").json()  # same bytes, shared session
    assert client.delete(f"/v2/repository/models/{a['model_id']}").json()["name"] == "a"
    assert client.post("/v2/models/b/infer", json=JSON_REQUEST).status_code == 200
    assert client.delete(f"/v2/repository/models/{MODEL_SHA}").json()["model_id"] == b["model_id"]
    assert client.get("/v2/repository/index").json() == []


# ----------------------------------------------------------------------------- inference


def test_json_inference_exact_outputs(client: TestClient) -> None:
    _upload(client, "double")
    response = client.post("/v2/models/double/infer", json=JSON_REQUEST)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "model_name": "double",
        "model_version": "1",
        "id": "req-1",
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [3.0, -4.0, 6.5, 0.0]},
            {"name": "j", "datatype": "INT32", "shape": [3], "data": [-1, 2, -2147483647]},
        ],
    }
    versioned = client.post("/v2/models/double/versions/1/infer", json=JSON_REQUEST)
    assert versioned.json() == response.json()
    _error(
        client.post("/v2/models/double/versions/7/infer", json=JSON_REQUEST), 404, "unknown_model"
    )


def test_json_inference_selected_output(client: TestClient) -> None:
    _upload(client, "double")
    request = {**JSON_REQUEST, "outputs": [{"name": "j"}]}
    response = client.post("/v2/models/double/infer", json=request)
    assert response.json()["outputs"] == [
        {"name": "j", "datatype": "INT32", "shape": [3], "data": [-1, 2, -2147483647]}
    ]


def test_binary_inference_round_trip(client: TestClient) -> None:
    _upload(client, "double")
    x = np.array([[1.0, 2.0]], np.float32)
    i = np.array([7, 8, 9], np.int32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": 8},
                },
                {
                    "name": "i",
                    "datatype": "INT32",
                    "shape": [3],
                    "parameters": {"binary_data_size": 12},
                },
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    response = client.post(
        "/v2/models/double/infer",
        content=header + x.tobytes() + i.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    assert meta["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}
    ]
    np.testing.assert_array_equal(
        np.frombuffer(response.content[length:], "<f4"), np.array([2.0, 4.0], np.float32)
    )


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        (b"{not json", {}, "malformed_json"),
        (b"", {}, "malformed_json"),
        (b"\xff\xfe", {}, "malformed_json"),
        (b'{"inputs": [], "inputs": []}', {}, "malformed_json"),
        (b"[]", {}, "invalid_request"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}',
            {},
            "invalid_datatype",
        ),
        (b"{}", {"Inference-Header-Content-Length": "abc"}, "invalid_header_length"),
        (b"{}", {"Inference-Header-Content-Length": "3"}, "invalid_header_length"),
        (b"{}", {"Inference-Header-Content-Length": "-1"}, "invalid_header_length"),
    ],
)
def test_malformed_infer_requests(
    client: TestClient, body: bytes, headers: dict[str, str], code: str
) -> None:
    _upload(client, "double")
    _error(client.post("/v2/models/double/infer", content=body, headers=headers), 400, code)


@pytest.mark.parametrize(
    ("inputs", "code"),
    [
        ([{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}], "wrong_inputs"),
        (
            [
                {"name": "x", "datatype": "FP64", "shape": [1, 2], "data": [1, 2]},
                {"name": "i", "datatype": "INT32", "shape": [3], "data": [1, 2, 3]},
            ],
            "wrong_datatype",
        ),
        (
            [
                {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                {"name": "i", "datatype": "INT32", "shape": [3], "data": [1, 2, 3]},
            ],
            "wrong_shape",
        ),
    ],
)
def test_signature_mismatches_are_400(
    client: TestClient, inputs: list[dict[str, Any]], code: str
) -> None:
    _upload(client, "double")
    _error(client.post("/v2/models/double/infer", json={"inputs": inputs}), 400, code)


def test_unknown_output_is_400(client: TestClient) -> None:
    _upload(client, "double")
    request = {**JSON_REQUEST, "outputs": [{"name": "nope"}]}
    _error(client.post("/v2/models/double/infer", json=request), 400, "unknown_output")


def test_request_over_max_request_bytes(client: TestClient) -> None:
    _upload(client, "double")
    body = b" " * (MAX_REQUEST + 1)
    _error(client.post("/v2/models/double/infer", content=body), 413, "payload_too_large")
    lying = client.post(
        "/v2/models/double/infer", content=body + body, headers={"content-length": "2"}
    )
    _error(lying, 413, "payload_too_large")


# ----------------------------------------------------------------------------- attestation


def test_attestation_binds_identity_and_nonce(client: TestClient) -> None:
    nonce = bytes(range(32, 64))
    response = client.post("/v2/attestation", json={"nonce": nonce.hex()})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = parse_evidence_document(response.content)
    assert document.kind == "intel-sgx"
    assert document.platform == "simulation"
    assert document.nonce == nonce
    assert document.certificate_der == IDENTITY.certificate_der
    body = parse_sgx_quote(document.quote).body
    assert body.report_data == IDENTITY.spki_sha256 + nonce
    assert (body.mrenclave, body.mrsigner, body.isvprodid, body.isvsvn) == (
        MRE,
        SIMULATION_MRSIGNER,
        4,
        6,
    )
    verified = verify_evidence(
        document,
        policy=None,
        expected_nonce=nonce,
        tls_certificate_der=IDENTITY.certificate_der,
        allow_simulation=True,
    )
    assert verified.report_data == IDENTITY.spki_sha256 + nonce


def test_boot_evidence_has_zero_nonce(client: TestClient) -> None:
    document = parse_evidence_document(client.get("/v2/attestation").content)
    assert document.nonce == bytes(32)
    assert parse_sgx_quote(document.quote).body.report_data == IDENTITY.spki_sha256 + bytes(32)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"nonce": "00"}', "invalid_nonce"),
        (b'{"nonce": "' + b"0" * 66 + b'"}', "invalid_nonce"),
        (b'{"nonce": "' + b"z" * 64 + b'"}', "invalid_nonce"),
        (b'{"nonce": 1}', "invalid_nonce"),
        (b"{}", "invalid_nonce"),
        (b"nonce", "malformed_json"),
    ],
)
def test_bad_nonce(client: TestClient, body: bytes, code: str) -> None:
    _error(client.post("/v2/attestation", content=body), 400, code)


def test_oversized_attestation_request(client: TestClient) -> None:
    _error(client.post("/v2/attestation", content=b" " * 4097), 413, "payload_too_large")


# ----------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def fuzz_client() -> Iterator[TestClient]:
    with _client() as c:
        assert _upload(c, "fuzz").status_code == 201
        yield c


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(),
    st.text(max_size=8),
)
_JSONISH = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
_TENSOR = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "i", "y", "j", "", "zz"]),
        "datatype": st.sampled_from(["FP32", "INT32", "FP64", "BOOL", "BYTES", "fp32", "X"]),
        "shape": st.one_of(st.lists(st.integers(min_value=-2, max_value=4), max_size=3), _JSONISH),
    },
    optional={
        "data": st.one_of(
            st.lists(st.one_of(st.integers(-3, 3), st.floats(-4, 4), st.booleans()), max_size=9),
            _JSONISH,
        ),
        "parameters": st.one_of(
            st.fixed_dictionaries({"binary_data_size": st.integers(min_value=-4, max_value=40)}),
            st.fixed_dictionaries({"binary_data": st.booleans()}),
            _JSONISH,
        ),
    },
)
_REQUEST = st.fixed_dictionaries(
    {},
    optional={
        "id": _JSONISH,
        "inputs": st.one_of(st.lists(_TENSOR, max_size=3), _JSONISH),
        "outputs": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["y", "j", "x", "nope"])},
                    optional={"parameters": st.one_of(st.just({"binary_data": True}), _JSONISH)},
                ),
                max_size=3,
            ),
            _JSONISH,
        ),
        "parameters": st.one_of(st.just({"binary_data_output": True}), _JSONISH),
    },
)


def _encoded(document: dict[str, Any]) -> bytes:
    return json.dumps(document, allow_nan=True).encode()


_BODIES = st.one_of(
    st.binary(max_size=256),
    st.builds(_encoded, _REQUEST),
    st.builds(lambda d, tail: _encoded(d) + tail, _REQUEST, st.binary(max_size=48)),
)
_HEADER_VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-5, max_value=600).map(str),
    st.text(alphabet="0123456789+-_. xX٣", max_size=24),
    st.just("9" * 30),
)


_DATATYPE_ELEMENTS = {
    "FP32": ("<f4", st.floats(-1e6, 1e6, width=32)),
    "FP64": ("<f8", st.floats(-1e6, 1e6)),
    "INT32": ("<i4", st.integers(-(1 << 31), (1 << 31) - 1)),
    "INT64": ("<i8", st.integers(-(1 << 63), (1 << 63) - 1)),
    "BOOL": ("?", st.booleans()),
}


@st.composite
def _near_valid(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """Mostly well-formed requests for the fuzz model, some fields perturbed: these reach
    the signature checks and onnxruntime, not only the JSON parser."""
    rows = draw(st.integers(0, 3))
    specs = [("x", "FP32", [rows, 2]), ("i", "INT32", [3])]
    specs = draw(st.permutations(specs))
    if draw(st.booleans()):
        specs = specs[: draw(st.integers(0, 2))]
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, datatype, shape in specs:
        if draw(st.integers(0, 4)) == 0:
            datatype = draw(st.sampled_from(sorted(_DATATYPE_ELEMENTS)))
        if draw(st.integers(0, 4)) == 0:
            shape = draw(st.lists(st.integers(0, 3), max_size=3))
        dtype, elements = _DATATYPE_ELEMENTS[datatype]
        count = int(np.prod(shape)) if shape else 1
        values = draw(st.lists(elements, min_size=count, max_size=count))
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if draw(st.booleans()):
            raw = np.array(values, dtype=dtype).tobytes()
            blobs.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        else:
            entry["data"] = values
        entries.append(entry)
    document: dict[str, Any] = {"inputs": entries}
    if draw(st.booleans()):
        document["outputs"] = [
            {"name": n, "parameters": {"binary_data": draw(st.booleans())}}
            for n in draw(st.lists(st.sampled_from(["y", "j", "x"]), max_size=2, unique=True))
        ]
    if draw(st.booleans()):
        document["parameters"] = {"binary_data_output": draw(st.booleans())}
    header = json.dumps(document).encode()
    body = header + b"".join(blobs)
    declared = bool(blobs) or draw(st.booleans())
    length = str(len(header)) if declared else None
    if draw(st.integers(0, 5)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    if draw(st.integers(0, 5)) == 0:
        length = str(draw(st.integers(0, len(body) + 2)))
    return body, length


_CASES = st.one_of(st.tuples(_BODIES, _HEADER_VALUES), _near_valid(), _near_valid())


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=_CASES)
def test_fuzzed_infer_requests_never_cause_500(
    fuzz_client: TestClient, case: tuple[bytes, str | None]
) -> None:
    body, header = case
    headers: dict[bytes, bytes] = {}
    if header is not None:
        headers[b"Inference-Header-Content-Length"] = header.encode("utf-8")
    response = fuzz_client.post("/v2/models/fuzz/infer", content=body, headers=headers)
    if response.status_code == 200:
        length = response.headers.get("inference-header-content-length")
        meta = json.loads(response.content[: int(length)] if length else response.content)
        assert meta["model_name"] == "fuzz"
        assert {o["name"] for o in meta["outputs"]} <= {"y", "j"}
    else:
        assert 400 <= response.status_code < 500, (
            response.status_code,
            response.text,
            body,
            header,
        )
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()) == {"error", "code"}
    ready = fuzz_client.get("/v2/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}
