"""Upload, run and delete real ONNX models on a real server over attested TLS.

Outputs must be bit-identical to onnxruntime in-process on the same model and inputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

import blindinfer
from blindinfer.client.transport import pinned_context
from support import onnx_models as zoo

pytestmark = pytest.mark.e2e


def in_process(model: bytes, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def assert_bit_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        assert got[name].tobytes() == expected.tobytes(), name


def test_every_dtype_round_trips_bit_exactly(client: blindinfer.Client) -> None:
    model = zoo.model_bytes(zoo.dtype_identity_model())
    info = client.upload_model(model, name="dtypes")
    assert info.name == "dtypes"
    try:
        for rows, cols in [(3, 5), (1, 1), (7, 2)]:  # dynamic shapes
            feed = zoo.dtype_identity_feed(rows, cols)
            outputs = client.run_model(info.model_id, feed)
            assert_bit_identical(outputs, in_process(model, feed))
            for dtype in zoo.DTYPES:
                np.testing.assert_array_equal(outputs[f"out_{dtype}"], feed[f"in_{dtype}"])
    finally:
        client.delete_model(info.model_id)


def test_several_inputs_and_outputs_with_dynamic_batch(client: blindinfer.Client) -> None:
    model = zoo.model_bytes(zoo.multi_io_model())
    client.upload_model(model, name="multi-io")
    try:
        for batch in (1, 4, 33):
            feed = zoo.multi_io_feed(batch=batch)
            assert_bit_identical(client.run_model("multi-io", feed), in_process(model, feed))
        feed = zoo.multi_io_feed(batch=2)
        only = client.run_model("multi-io", feed, outputs=["logits"])
        assert list(only) == ["logits"]
    finally:
        client.delete_model("multi-io")


def test_run_by_name_model_id_and_hash(client: blindinfer.Client) -> None:
    model = zoo.model_bytes(zoo.mlp_model())
    info = client.upload_model(model, name="mlp-refs")
    assert info.sha256 == hashlib.sha256(model).hexdigest()
    feed = {"x": np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)}
    want = in_process(model, feed)
    try:
        for ref in ("mlp-refs", info.model_id, info.sha256):
            assert_bit_identical(client.run_model(ref, feed), want)
        # one-input models also take a bare array
        assert_bit_identical(client.run_model("mlp-refs", feed["x"]), want)
    finally:
        client.delete_model(info.model_id)
    with pytest.raises(blindinfer.ServerError) as caught:
        client.run_model(info.model_id, feed)
    assert (caught.value.status, caught.value.code) == (404, "unknown_model")


def test_upload_from_path_bytes_and_modelproto_dedups(
    client: blindinfer.Client, tmp_path: Path
) -> None:
    proto = zoo.mlp_model(seed=7)
    data = zoo.model_bytes(proto)
    path = tmp_path / "mlp.onnx"
    path.write_bytes(data)
    a = client.upload_model(path, name="from-path")
    b = client.upload_model(data, name="from-bytes")
    c = client.upload_model(proto, name="from-proto")
    again = client.upload_model(data, name="from-bytes")
    try:
        assert a.sha256 == b.sha256 == c.sha256 == hashlib.sha256(data).hexdigest()
        assert len({a.model_id, b.model_id, c.model_id}) == 3
        assert again == b  # identical re-upload under the same name: same model
        names = {m.name for m in client.list_models()}
        assert {"from-path", "from-bytes", "from-proto"} <= names
    finally:
        for info in (a, b, c):
            client.delete_model(info.model_id)
    assert not {"from-path", "from-bytes", "from-proto"} & {m.name for m in client.list_models()}


def test_inputs_as_lists_with_dtype_and_shape_and_torch(client: blindinfer.Client) -> None:
    model = zoo.model_bytes(zoo.multi_io_model())
    client.upload_model(model, name="plain-inputs")
    feed = zoo.multi_io_feed(batch=2)
    want = in_process(model, feed)
    try:
        plain = {
            name: blindinfer.Tensor(a.ravel().tolist(), str(a.dtype), a.shape)
            for name, a in feed.items()
        }
        assert_bit_identical(client.run_model("plain-inputs", plain), want)
        as_dicts = {
            name: {"data": a.tolist(), "dtype": str(a.dtype), "shape": list(a.shape)}
            for name, a in feed.items()
        }
        assert_bit_identical(client.run_model("plain-inputs", as_dicts), want)
        torch = pytest.importorskip("torch")
        tensors = {name: torch.from_numpy(a.copy()) for name, a in feed.items()}
        assert_bit_identical(client.run_model("plain-inputs", tensors), want)
    finally:
        client.delete_model("plain-inputs")


def test_open_inference_protocol_json_over_the_pinned_channel(client: blindinfer.Client) -> None:
    """Any OIP client speaks JSON: check the server's JSON path with a raw request."""
    model = zoo.model_bytes(zoo.mlp_model(in_features=4, hidden=8, out_features=3))
    client.upload_model(model, name="json-mlp")
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
    want = in_process(model, {"x": x})
    context = pinned_context(client.attestation.certificate_der)
    try:
        with httpx.Client(base_url=client.url, verify=context) as raw:
            request: dict[str, Any] = {
                "id": "r-1",
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}
                ],
            }
            reply = raw.post("/v2/models/json-mlp/infer", json=request)
            assert reply.status_code == 200
            document = json.loads(reply.content)
            assert document["id"] == "r-1" and document["model_name"] == "json-mlp"
            (output,) = document["outputs"]
            assert (output["name"], output["datatype"], output["shape"]) == (
                "probabilities",
                "FP32",
                [2, 3],
            )
            got = np.asarray(output["data"], dtype=np.float32).reshape(2, 3)
            assert got.tobytes() == want["probabilities"].tobytes()
            meta = raw.get("/v2/models/json-mlp").json()
            assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
            assert raw.get("/v2/health/ready").json() == {"ready": True}
    finally:
        client.delete_model("json-mlp")
