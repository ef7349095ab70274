"""The response limit (issue 21, item 2): outputs are sized in the worker, before they
cross into the server, and refused over `max_response_bytes`.

What is checked: the JSON bound per element is never below what the encoder writes (the
longest value of every datatype, and random bit patterns); the bound's encoding choice
crosses the pipe intact; a real worker pool refuses an Expand to 64 M elements with
ResponseTooLargeError (binary and JSON), keeps its worker (the pipe stays in step) and
serves normal runs afterwards; the chunked JSON encoder writes exactly what `json.dumps`
of the whole document writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from blindinfer.protocol.datatypes import DATATYPES
from blindinfer.protocol.inference import (
    HEADER_LENGTH,
    encode_infer_response,
    parse_infer_response,
)
from blindinfer.protocol.limits import TensorLimits
from blindinfer.runtime.errors import ResponseTooLargeError
from blindinfer.runtime.response_size import OutputEncoding, response_bytes, tensor_bytes
from blindinfer.runtime.workers import WorkerPool
from support import hostile_models

GIB = 1 << 30
MIB = 1 << 20
ATTACK = 64 << 20  # elements: 256 MiB of FP32, as in the issue

LONGEST: dict[str, list[Any]] = {
    "BOOL": [False, True],
    "INT8": [-128, 127],
    "UINT8": [255],
    "INT16": [-32768],
    "UINT16": [65535],
    "INT32": [-(2**31)],
    "UINT32": [2**32 - 1],
    "INT64": [-(2**63)],
    "UINT64": [2**64 - 1],
    "FP16": [-5.960464477539063e-08, -6.1e-05, np.nan, -np.inf],
    "FP32": [-1.1754942e-38, -1.1754944e-38, -3.4028235e38, np.nan, -np.inf],
    "FP64": [-2.2250738585072014e-308, -5e-324, -1.7976931348623157e308, np.nan],
}


def _random_bits(datatype: str, count: int) -> npt.NDArray[Any]:
    dtype = DATATYPES[datatype]
    raw = np.random.default_rng(7).integers(0, 256, count * dtype.itemsize, dtype=np.uint8)
    if datatype == "BOOL":
        return raw.astype(bool)
    return raw.view(dtype)


def _json_bytes_of(name: str, array: npt.NDArray[Any]) -> int:
    """What one output adds to a JSON response, measured against an empty one."""
    body, _ = encode_infer_response("m", None, None, {name: array}, ())
    empty, _ = encode_infer_response("m", None, None, {}, ())
    return len(body) - len(empty)


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_json_bound_is_never_below_the_encoding(datatype: str) -> None:
    dtype = DATATYPES[datatype]
    longest = np.array(LONGEST[datatype] * 1000, dtype=dtype).reshape(10, -1)
    for array in (longest, _random_bits(datatype, 200_000), np.zeros((3, 0), dtype)):
        name = 'out\u00e9"\\' * 3  # escaped in JSON: counted at its worst
        bound = tensor_bytes(name, array.dtype, array.shape, binary=False)
        assert _json_bytes_of(name, array) <= bound
        assert tensor_bytes(name, array.dtype, array.shape, binary=True) >= array.nbytes
    # tight enough to be useful: the longest values use most of their bound
    per_element = (
        tensor_bytes("y", dtype, (1000,), False) - tensor_bytes("y", dtype, (0,), False)
    ) / 1000
    worst = _json_bytes_of("y", np.resize(np.array(LONGEST[datatype][:1], dtype), 1000)) / 1000
    assert worst >= per_element - 2


def test_response_bytes_follows_the_encoding_choice() -> None:
    outputs: dict[str, npt.NDArray[Any]] = {
        "a": np.zeros(1000, np.float32),
        "b": np.zeros(1000, np.int64),
    }
    all_binary = response_bytes(outputs, OutputEncoding())
    all_json = response_bytes(outputs, OutputEncoding(binary_default=False))
    mixed = response_bytes(outputs, OutputEncoding(binary_default=False, binary={"a": True}))
    assert all_binary < mixed < all_json
    assert all_binary >= 1000 * 4 + 1000 * 8
    assert all_json >= 1000 * 24 + 1000 * 21


def test_output_encoding_crosses_the_pipe_intact_and_malformed_ones_are_refused() -> None:
    choice = OutputEncoding(binary_default=False, binary={"y": True, "z": False})
    assert OutputEncoding.from_wire(json.loads(json.dumps(choice.to_wire()))) == choice
    assert OutputEncoding.from_wire(None) == OutputEncoding()  # all binary
    for bad in ([1, {}], [True], "json", [True, {"y": 1}], [True, {"y": None}], [False, []]):
        with pytest.raises(ValueError, match="malformed output encoding"):
            OutputEncoding.from_wire(bad)


def test_chunked_json_encoding_is_byte_identical_to_one_dumps() -> None:
    rng = np.random.default_rng(3)
    outputs: dict[str, npt.NDArray[Any]] = {
        "big": rng.standard_normal((3, 70_001)).astype(np.float32),  # crosses chunk borders
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), np.int64),
        "flags": np.array([[True, False]]),
        "odd": np.array([np.nan, np.inf, -np.inf, 0.1], np.float16),
    }
    for binary in (set(), {"big", "empty"}, set(outputs)):
        body, headers = encode_infer_response(
            "m", "1", "r-1", outputs, binary, {"receipt": {"alg": "x"}}
        )
        document: dict[str, Any] = {
            "model_name": "m",
            "model_version": "1",
            "id": "r-1",
            "parameters": {"receipt": {"alg": "x"}},
            "outputs": [],
        }
        tail = b""
        for name, array in outputs.items():
            entry: dict[str, Any] = {"name": name, "datatype": "", "shape": list(array.shape)}
            entry["datatype"] = next(k for k, v in DATATYPES.items() if v == array.dtype)
            if name in binary:
                entry["parameters"] = {"binary_data_size": array.nbytes}
                tail += array.tobytes()
            else:
                entry["data"] = array.reshape(-1).tolist()
            document["outputs"].append(entry)
        head = json.dumps(document, separators=(",", ":"), allow_nan=True).encode()
        assert body == head + tail
        length = headers.get(HEADER_LENGTH)
        assert (length is None) == (not binary)
        parsed = parse_infer_response(
            body,
            None if length is None else int(length),
            TensorLimits(max_total_bytes=1 << 30, max_header_bytes=1 << 30),
        )
        for name, array in outputs.items():
            assert np.array_equal(parsed.outputs[name], array, equal_nan=True)


# --------------------------------------------------------------------- a real worker pool


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    model = hostile_models.expand_output_model()
    with WorkerPool(
        workers=1,
        memory_limit_bytes=2 * GIB,
        timeout_s=30.0,
        intra_op_threads=1,
        source=lambda key: model,
        max_response_bytes=1 * MIB,
    ) as running:
        running.load("expand", model)
        yield running


def _shape(n: int) -> dict[str, npt.NDArray[Any]]:
    return {"shape": np.array([n], np.int64)}


def test_worker_refuses_an_expand_to_64m_elements_and_keeps_serving(pool: WorkerPool) -> None:
    (before,) = pool.stats()
    with pytest.raises(ResponseTooLargeError) as refused:
        pool.run("expand", _shape(ATTACK))
    error = refused.value
    assert error.code == "response_too_large"
    assert error.limit == 1 * MIB and error.size >= ATTACK * 4
    assert f"{error.size} bytes (256.0 MiB)" in str(error)
    assert "the limit is 1048576 bytes (1.0 MiB, --max-response-bytes)" in str(error)
    (after,) = pool.stats()
    assert (after.pid, after.restarts) == (before.pid, before.restarts)  # not replaced
    y = pool.run("expand", _shape(1000))["y"]
    assert y.shape == (1000,) and bool((y == 1).all())


def test_json_outputs_count_at_their_encoded_bound(pool: WorkerPool) -> None:
    n = 100_000  # 400 KB of FP32: fits as binary data, not as up to 2.4 MB of JSON
    as_json = OutputEncoding(binary_default=False)
    assert pool.run("expand", _shape(n))["y"].nbytes == 4 * n
    with pytest.raises(ResponseTooLargeError) as refused:
        pool.run("expand", _shape(n), encoding=as_json)
    message = str(refused.value)
    assert "as JSON (400000 bytes (390.6 KiB) of tensor data)" in message
    assert "ask for the outputs as binary data" in message
    named_binary = OutputEncoding(binary_default=False, binary={"y": True})
    assert pool.run("expand", _shape(n), encoding=named_binary)["y"].shape == (n,)
    assert pool.run("expand", _shape(1000), encoding=as_json)["y"].shape == (1000,)
