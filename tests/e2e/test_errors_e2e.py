"""Every bad input gets a structured 4xx from a real server, which keeps serving."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

import blindinfer
from blindinfer.client.transport import pinned_context
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import start_server
from support import onnx_models as zoo

from .conftest import policy_for

pytestmark = pytest.mark.e2e

LIMITS = Limits(max_model_bytes=200_000, max_request_bytes=50_000, max_models=3)


@pytest.fixture(scope="module")
def small() -> Iterator[tuple[blindinfer.Client, httpx.Client]]:
    args = [
        "--simulation",
        f"--max-model-bytes={LIMITS.max_model_bytes}",
        f"--max-request-bytes={LIMITS.max_request_bytes}",
        f"--max-models={LIMITS.max_models}",
    ]
    with start_server(args) as server:
        policy = policy_for(ServerConfig(simulation=True, limits=LIMITS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(server.url, policy=policy, simulation=True)
        raw = httpx.Client(
            base_url=server.url, verify=pinned_context(client.attestation.certificate_der)
        )
        with client, raw:
            yield client, raw


def expect_error(reply: httpx.Response, status: int, code: str) -> str:
    assert reply.status_code == status, reply.text
    document = json.loads(reply.content)
    assert set(document) == {"error", "code"}
    assert document["code"] == code
    assert "Traceback" not in reply.text and 'File "' not in reply.text
    return str(document["error"])


@pytest.fixture(autouse=True)
def still_serving(small: tuple[blindinfer.Client, httpx.Client]) -> Iterator[None]:
    yield
    assert small[1].get("/v2/health/ready").json() == {"ready": True}


def test_not_an_onnx_model(small: tuple[blindinfer.Client, httpx.Client]) -> None:
    _, raw = small
    for label, data in zoo.invalid_model_bytes().items():
        reply = raw.put(f"/v2/repository/models/bad-{label}/upload", content=data)
        expect_error(reply, 400, "invalid_model")


def test_model_over_the_size_limit(small: tuple[blindinfer.Client, httpx.Client]) -> None:
    _, raw = small
    big = bytes(LIMITS.max_model_bytes + 1)
    message = expect_error(
        raw.put("/v2/repository/models/big/upload", content=big), 413, "payload_too_large"
    )
    assert str(LIMITS.max_model_bytes) in message

    def chunks() -> Iterator[bytes]:  # no Content-Length: the bound holds while streaming
        for _ in range(LIMITS.max_model_bytes // 10_000 + 2):
            yield bytes(10_000)

    expect_error(
        raw.put("/v2/repository/models/big/upload", content=chunks()), 413, "payload_too_large"
    )


def test_unknown_model_and_route(small: tuple[blindinfer.Client, httpx.Client]) -> None:
    client, raw = small
    with pytest.raises(blindinfer.ServerError) as caught:
        client.run_model("nope", {"x": np.zeros((1, 64), np.float32)})
    assert (caught.value.status, caught.value.code) == (404, "unknown_model")
    expect_error(raw.get("/v2/nothing/here"), 404, "not_found")
    expect_error(raw.delete("/v2/health/live"), 405, "method_not_allowed")


def test_wrong_inputs_dtypes_and_shapes(small: tuple[blindinfer.Client, httpx.Client]) -> None:
    client, raw = small
    client.upload_model(zoo.mlp_model(), name="mlp")
    try:
        cases = [
            ({"y": np.zeros((1, 64), np.float32)}, "wrong_inputs"),
            ({"x": np.zeros((1, 64), np.float64)}, "wrong_datatype"),
            ({"x": np.zeros((1, 63), np.float32)}, "wrong_shape"),
            ({"x": np.zeros((64,), np.float32)}, "wrong_shape"),
        ]
        for feed, code in cases:
            with pytest.raises(blindinfer.ServerError) as caught:
                client.run_model("mlp", feed)
            assert (caught.value.status, caught.value.code) == (400, code)
        expect_error(raw.post("/v2/models/mlp/infer", content=b"{not json"), 400, "malformed_json")
        too_big = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 20000}]
        }
        expect_error(raw.post("/v2/models/mlp/infer", json=too_big), 413, "payload_too_large")
        lying = raw.post(
            "/v2/models/mlp/infer",
            content=b'{"inputs":[]}',
            headers={"Inference-Header-Content-Length": "999"},
        )
        expect_error(lying, 400, "invalid_header_length")
    finally:
        client.delete_model("mlp")


def test_model_count_limit_and_name_conflict(small: tuple[blindinfer.Client, httpx.Client]) -> None:
    client, raw = small
    uploaded = [client.upload_model(zoo.mlp_model(seed=s), name=f"m{s}") for s in range(3)]
    try:
        expect_error(
            raw.put(
                "/v2/repository/models/m1/upload", content=zoo.model_bytes(zoo.mlp_model(seed=9))
            ),
            409,
            "model_name_conflict",
        )
        expect_error(
            raw.put(
                "/v2/repository/models/m3/upload", content=zoo.model_bytes(zoo.mlp_model(seed=3))
            ),
            507,
            "store_full",
        )
    finally:
        for info in uploaded:
            client.delete_model(info.model_id)
    assert client.list_models() == []
