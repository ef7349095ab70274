"""The OIP v2 inference codec: exact round trips, every error code, and fuzzing.

The codec is the boundary where untrusted bytes become tensors on both sides, so the
tests insist on bit-exact round trips and on ProtocolError being the only way out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from blindinfer.errors import ProtocolError
from blindinfer.protocol.datatypes import (
    DATATYPES,
    ONNX_TYPES,
    datatype_to_dtype,
    dtype_to_datatype,
    onnx_to_datatype,
)
from blindinfer.protocol.inference import (
    CONTENT_TYPE_BINARY,
    CONTENT_TYPE_JSON,
    ERROR_CODES,
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    encode_error,
    encode_infer_request,
    encode_infer_response,
    parse_error,
    parse_header_length,
    parse_infer_request,
    parse_infer_response,
)
from blindinfer.protocol.limits import TensorLimits

LIMITS = TensorLimits()
Array = npt.NDArray[Any]


# --------------------------------------------------------------------------- helpers


def _bits(array: Array) -> bytes:
    """The exact little-endian bytes of an array, for bit-exact comparison."""
    dtype = DATATYPES[dtype_to_datatype(array.dtype)]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _canonical_nan(array: Array) -> Array:
    """Replace every NaN by the canonical one: JSON keeps NaN-ness, not sign or payload."""
    out = np.array(array, dtype=DATATYPES[dtype_to_datatype(array.dtype)])
    if out.dtype.kind == "f":
        out[np.isnan(out)] = np.nan
    return out


def _assert_bit_exact(got: Array, want: Array, *, json_nan: bool = False) -> None:
    if json_nan:
        want = _canonical_nan(want)
    assert got.dtype == DATATYPES[dtype_to_datatype(want.dtype)]
    assert got.shape == want.shape
    assert _bits(got) == _bits(want)
    assert got.flags.c_contiguous
    assert got.flags.aligned
    assert not got.flags.writeable


def _request(body: bytes, headers: dict[str, str], limits: TensorLimits = LIMITS) -> InferRequest:
    return parse_infer_request(body, parse_header_length(headers.get(HEADER_LENGTH)), limits)


def _response(body: bytes, headers: dict[str, str], limits: TensorLimits = LIMITS) -> InferResponse:
    return parse_infer_response(body, parse_header_length(headers.get(HEADER_LENGTH)), limits)


def _doc(inputs: list[Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": inputs, **extra}


def _binary_body(doc: Any, payload: bytes = b"") -> tuple[bytes, int]:
    head = json.dumps(doc).encode()
    return head + payload, len(head)


def _expect(code: str, fragment: str, call: Callable[[], object]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call()
    assert info.value.code == code, info.value
    assert fragment in info.value.message, info.value.message
    return info.value


def _sample(datatype: str) -> Array:
    """Extreme values of a datatype, shaped (2, 3) or so."""
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dtype)
    finfo = np.finfo(dtype)
    values = [
        0.0,
        -0.0,
        np.inf,
        -np.inf,
        np.nan,
        float(finfo.max),
        float(finfo.min),
        float(finfo.smallest_subnormal),
        -float(finfo.smallest_normal),
        float(finfo.eps),
        0.1,
        -1 / 3,
    ]
    return np.array(values, dtype=dtype).reshape(3, 4)


ALL_DATATYPES = sorted(DATATYPES)


# --------------------------------------------------------------------------- datatypes


def test_datatype_table_round_trips() -> None:
    for name, dtype in DATATYPES.items():
        assert datatype_to_dtype(name) == dtype
        assert dtype_to_datatype(dtype) == name
        assert dtype.byteorder in "<|="
        assert dtype_to_datatype(dtype.newbyteorder(">")) == name
    assert sorted(ONNX_TYPES.values()) == ALL_DATATYPES
    assert onnx_to_datatype("tensor(float)") == "FP32"
    assert onnx_to_datatype("tensor(float16)") == "FP16"
    assert onnx_to_datatype("tensor(double)") == "FP64"
    assert onnx_to_datatype("tensor(int8)") == "INT8"
    assert onnx_to_datatype("tensor(bool)") == "BOOL"


def test_datatype_rejections() -> None:
    _expect("unsupported_datatype", "BYTES", lambda: datatype_to_dtype("BYTES"))
    _expect("invalid_datatype", "FLOAT32", lambda: datatype_to_dtype("FLOAT32"))
    _expect("invalid_datatype", "fp32", lambda: datatype_to_dtype("fp32"))
    _expect("unsupported_datatype", "complex64", lambda: dtype_to_datatype(np.complex64))
    _expect("unsupported_datatype", "<U3", lambda: dtype_to_datatype(np.dtype("<U3")))
    _expect("unsupported_datatype", "object", lambda: dtype_to_datatype(object))
    _expect("unsupported_datatype", "string", lambda: onnx_to_datatype("tensor(string)"))
    _expect("unsupported_datatype", "bfloat16", lambda: onnx_to_datatype("tensor(bfloat16)"))


def test_limits_reject_incoherent_configuration() -> None:
    with pytest.raises(ValueError, match="max_tensors"):
        TensorLimits(max_tensors=0)
    with pytest.raises(ValueError, match="max_rank"):
        TensorLimits(max_rank=65)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
@pytest.mark.parametrize("binary", [True, False])
def test_request_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    array = _sample(datatype)
    body, headers = encode_infer_request(
        {"x": array, "scalar": array.reshape(-1)[:1].reshape(()), "empty": array[:0]},
        binary=binary,
        request_id="req-1",
    )
    assert headers["Content-Type"] == (CONTENT_TYPE_BINARY if binary else CONTENT_TYPE_JSON)
    assert (HEADER_LENGTH in headers) is binary
    request = _request(body, headers)
    assert request.id == "req-1"
    assert [i.name for i in request.inputs] == ["x", "scalar", "empty"]
    for parsed, want in zip(request.inputs, [array, array.reshape(-1)[0], array[:0]], strict=True):
        assert parsed.datatype == datatype
        assert parsed.shape == np.shape(want)
        _assert_bit_exact(parsed.array, np.asarray(want, dtype=array.dtype))


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
@pytest.mark.parametrize("binary", [True, False])
def test_response_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    array = _sample(datatype)
    body, headers = encode_infer_response(
        "model", "1", "id-7", {"y": array}, {"y"} if binary else set()
    )
    response = _response(body, headers)
    assert (response.model_name, response.model_version, response.id) == ("model", "1", "id-7")
    _assert_bit_exact(response.outputs["y"], array)


def test_float16_every_bit_pattern() -> None:
    array = np.arange(1 << 16, dtype=np.uint16).view("<f2")
    body, headers = encode_infer_response("m", None, None, {"b": array}, {"b"})
    _assert_bit_exact(_response(body, headers).outputs["b"], array)
    body, headers = encode_infer_response("m", None, None, {"j": array}, ())
    assert b"NaN" in body
    assert b"Infinity" in body
    _assert_bit_exact(_response(body, headers).outputs["j"], array, json_nan=True)


def test_float32_random_bits_json_exact() -> None:
    rng = np.random.default_rng(1)
    array = rng.integers(0, 1 << 32, size=4096, dtype=np.uint64).astype("<u4").view("<f4")
    body, headers = encode_infer_request({"x": array}, binary=False)
    _assert_bit_exact(_request(body, headers).inputs[0].array, array, json_nan=True)


def test_nan_payloads_survive_binary_only() -> None:
    f32 = np.array([0x7FA00001, 0xFFC00123, 0x7FC00000, 0xFF800000], dtype="<u4").view("<f4")
    f64 = np.array([0x7FF0000000000001, 0xFFF8000000000ABC], dtype="<u8").view("<f8")
    body, headers = encode_infer_request({"a": f32, "b": f64})
    parsed = _request(body, headers)
    _assert_bit_exact(parsed.inputs[0].array, f32)
    _assert_bit_exact(parsed.inputs[1].array, f64)
    body, headers = encode_infer_request({"a": f32}, binary=False)
    got = _request(body, headers).inputs[0].array
    assert np.isnan(got[:3]).all()
    assert got[3] == -np.inf


def test_big_endian_and_strided_arrays_encode_as_little_endian() -> None:
    big = np.arange(12, dtype=">i4").reshape(3, 4)
    strided = np.arange(24, dtype=np.float64).reshape(4, 6)[::2, ::3]
    body, headers = encode_infer_request({"big": big, "strided": strided})
    assert np.arange(12, dtype="<i4").tobytes() in body
    parsed = _request(body, headers)
    _assert_bit_exact(parsed.inputs[0].array, big)
    _assert_bit_exact(parsed.inputs[1].array, strided)


def test_nested_and_flat_json_data_are_equivalent() -> None:
    flat = {"name": "f", "datatype": "INT64", "shape": [2, 2, 3], "data": list(range(12))}
    nested = {
        "name": "n",
        "datatype": "INT64",
        "shape": [2, 2, 3],
        "data": [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]],
    }
    empty = {"name": "e", "datatype": "FP32", "shape": [2, 0], "data": [[], []]}
    body = json.dumps(_doc([flat, nested, empty])).encode()
    request = parse_infer_request(body, None, LIMITS)
    want = np.arange(12, dtype="<i8").reshape(2, 2, 3)
    _assert_bit_exact(request.inputs[0].array, want)
    _assert_bit_exact(request.inputs[1].array, want)
    assert request.inputs[2].array.shape == (2, 0)


def test_mixed_binary_and_json_inputs() -> None:
    ids = np.array([[101, 2023, 102]], dtype="<i8")
    mask = np.ones((1, 3), dtype="<i8")
    doc = _doc(
        [
            {"name": "ids", "datatype": "INT64", "shape": [1, 3],
             "parameters": {"binary_data_size": 24}},
            {"name": "flag", "datatype": "BOOL", "shape": [1], "data": [True]},
            {"name": "mask", "datatype": "INT64", "shape": [1, 3],
             "parameters": {"binary_data_size": 24, "other": "ignored"}},
        ],
        id="mixed",
        outputs=[
            {"name": "a", "parameters": {"binary_data": True}},
            {"name": "b"},
        ],
    )  # fmt: skip
    body, length = _binary_body(doc, ids.tobytes() + mask.tobytes())
    request = parse_infer_request(body, length, LIMITS)
    assert [i.name for i in request.inputs] == ["ids", "flag", "mask"]
    _assert_bit_exact(request.inputs[0].array, ids)
    _assert_bit_exact(request.inputs[1].array, np.array([True]))
    _assert_bit_exact(request.inputs[2].array, mask)
    assert [(o.name, o.binary) for o in request.outputs] == [("a", True), ("b", False)]
    assert request.wants_binary("a")
    assert not request.wants_binary("b")
    assert not request.wants_binary("unlisted")


def test_requested_outputs_and_binary_default() -> None:
    body, headers = encode_infer_request({"x": np.zeros(1, np.float32)}, outputs=["p", "q"])
    request = _request(body, headers)
    assert request.binary_output_default
    assert [(o.name, o.binary) for o in request.outputs] == [("p", True), ("q", True)]
    body, headers = encode_infer_request({"x": np.zeros(1, np.float32)})
    assert _request(body, headers).outputs == ()
    assert _request(body, headers).wants_binary("anything")
    doc = _doc([], parameters={"binary_data_output": True}, outputs=[
        {"name": "p", "parameters": {"binary_data": False}}, {"name": "q"}])  # fmt: skip
    request = parse_infer_request(json.dumps(doc).encode(), None, LIMITS)
    assert [(o.name, o.binary) for o in request.outputs] == [("p", False), ("q", True)]
    body, headers = encode_infer_request({}, outputs=["p"], binary=False)
    request = _request(body, headers)
    assert request.outputs[0].binary is False
    assert request.id is None


def test_mixed_response_keeps_order_and_only_listed_outputs_are_binary() -> None:
    outputs = {
        "first": np.array([1.5, -2.25], dtype=np.float32),
        "second": np.arange(4, dtype=np.int32).reshape(2, 2),
        "third": np.array([True, False]),
    }
    body, headers = encode_infer_response("m", None, None, outputs, {"second", "nope"})
    head = json.loads(body[: int(headers[HEADER_LENGTH])])
    assert [o.get("data") is None for o in head["outputs"]] == [False, True, False]
    response = _response(body, headers)
    assert list(response.outputs) == ["first", "second", "third"]
    assert response.model_version is None
    assert response.id is None
    for name, array in outputs.items():
        _assert_bit_exact(response.outputs[name], array)
    body, headers = encode_infer_response("m", None, None, outputs, ())
    assert headers == {"Content-Type": CONTENT_TYPE_JSON}


def test_unaligned_binary_data_is_copied_aligned() -> None:
    array = np.arange(5, dtype="<f8")
    for pad in range(8):
        doc = _doc([{"name": "x", "datatype": "FP64", "shape": [5],
                     "parameters": {"binary_data_size": 40}}], id="p" * (pad + 1))  # fmt: skip
        body, length = _binary_body(doc, array.tobytes())
        _assert_bit_exact(parse_infer_request(body, length, LIMITS).inputs[0].array, array)


def test_nan_and_infinity_json_tokens_are_accepted_for_float_types_only() -> None:
    doc = _doc([{"name": "x", "datatype": "FP32", "shape": [3], "data": ["@", 1, 2]}])
    text = json.dumps(doc).replace('"@"', "NaN").replace("1, 2", "Infinity, -Infinity")
    got = parse_infer_request(text.encode(), None, LIMITS).inputs[0].array
    assert np.isnan(got[0])
    assert got[1] == np.inf
    assert got[2] == -np.inf
    _expect("invalid_tensor", "element 0", lambda: parse_infer_request(
        text.replace("FP32", "INT32").encode(), None, LIMITS))  # fmt: skip
    _expect("invalid_shape", "dimensions", lambda: parse_infer_request(
        text.replace("[3]", "[NaN]").encode(), None, LIMITS))  # fmt: skip


def test_header_length_parsing() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length("0") == 0
    assert parse_header_length(" 123\t") == 123
    for bad in ["", "-1", "+5", "1_000", "0x10", "\u0661\u0662", "1" * 20, "12 3"]:
        _expect("invalid_header_length", HEADER_LENGTH, partial(parse_header_length, bad))


def test_error_body() -> None:
    body = encode_error("size_mismatch", "input 'x': 3 bytes")
    assert json.loads(body) == {"error": "input 'x': 3 bytes", "code": "size_mismatch"}
    assert parse_error(body).code == "size_mismatch"
    assert parse_error(b'{"error": "plain OIP"}').code == "unspecified"
    assert parse_error(b'{"error": "plain OIP"}').message == "plain OIP"
    _expect("invalid_response", "error", lambda: parse_error(b'{"message": "x"}'))
    _expect("malformed_json", "JSON", lambda: parse_error(b"<html>"))


# --------------------------------------------------------------------------- error codes


def _tensor(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2]}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _MISSING}


_MISSING: Any = object()
SMALL = TensorLimits(max_tensors=4, max_rank=3, max_elements=100, max_total_bytes=256,
                     max_name_length=8, max_header_bytes=4096)  # fmt: skip


def _json_req(doc: Any, limits: TensorLimits = LIMITS) -> Callable[[], object]:
    return lambda: parse_infer_request(json.dumps(doc).encode(), None, limits)


def _bin_req(doc: Any, payload: bytes, limits: TensorLimits = LIMITS) -> Callable[[], object]:
    body, length = _binary_body(doc, payload)
    return lambda: parse_infer_request(body, length, limits)


def _raw_req(body: bytes, length: int | None = None) -> Callable[[], object]:
    return lambda: parse_infer_request(body, length, LIMITS)


BIN4 = {"binary_data_size": 4}
ERROR_CASES: list[tuple[str, str, Callable[[], object]]] = [
    ("malformed_json", "invalid JSON", _raw_req(b'{"inputs": [')),
    ("malformed_json", "UTF-8", _raw_req(b'{"id": "\xff"}')),
    ("malformed_json", "duplicate key 'inputs'", _raw_req(b'{"inputs": [], "inputs": []}')),
    ("malformed_json", "nested too deeply", _raw_req(b"[" * 200_000 + b"]" * 200_000)),
    ("malformed_json", "invalid JSON", _raw_req(b'{"inputs": []} {}')),
    ("malformed_json", "invalid JSON", _raw_req(b'{"id": ' + b"9" * 5000 + b"}")),
    ("malformed_json", "invalid JSON", _raw_req(b"")),
    ("invalid_header_length", "not within", _raw_req(b"{}", -1)),
    ("invalid_header_length", "not within", _raw_req(b"{}", 3)),
    ("header_too_large", "4097 bytes", lambda: parse_infer_request(b" " * 4097, None, SMALL)),
    ("header_too_large", "4097 bytes", lambda: parse_infer_request(b" " * 4098, 4097, SMALL)),
    ("invalid_request", "JSON object", _json_req([])),
    ("invalid_request", "no inputs", _json_req({})),
    ("invalid_request", "inputs must be a list", _json_req({"inputs": {}})),
    ("invalid_request", "request id", _json_req(_doc([], id=5))),
    ("invalid_request", "parameters", _json_req(_doc([], parameters=[]))),
    ("invalid_request", "binary_data_output", _json_req(
        _doc([], parameters={"binary_data_output": "yes"}))),
    ("invalid_request", "outputs must be a list", _json_req(_doc([], outputs={}))),
    ("invalid_tensor", "input #0 must be", _json_req(_doc(["x"]))),
    ("invalid_tensor", "input #0 name", _json_req(_doc([_tensor(name=_MISSING)]))),
    ("invalid_tensor", "input #0 name", _json_req(_doc([_tensor(name="")]))),
    ("invalid_tensor", "got [[[[...]]]]", _raw_req(
        b'{"inputs": [{"name": ' + b"[" * 900 + b"]" * 900 + b"}]}")),
    ("invalid_tensor", "longer than 8", _json_req(_doc([_tensor(name="n" * 9)]), SMALL)),
    ("invalid_tensor", "not valid Unicode", _raw_req(
        b'{"inputs": [{"name": "\\ud800", "datatype": "BOOL", "shape": [], "data": [true]}]}')),
    ("invalid_tensor", "both data and binary", _bin_req(
        _doc([_tensor(parameters={"binary_data_size": 8})]), bytes(8))),
    ("invalid_tensor", "neither data", _json_req(_doc([_tensor(data=_MISSING)]))),
    ("invalid_tensor", "data must be a list", _json_req(_doc([_tensor(data="AQID")]))),
    ("invalid_tensor", "input 'x': element 1 (2.0)", _json_req(_doc([_tensor(data=[1, 2.0])]))),
    ("invalid_tensor", "element 0 (True)", _json_req(_doc([_tensor(data=[True, 1])]))),
    ("invalid_tensor", "element 1 (1)", _json_req(
        _doc([_tensor(datatype="BOOL", data=[True, 1])]))),
    ("invalid_tensor", "element 0 ('1.5')", _json_req(
        _doc([_tensor(datatype="FP32", data=["1.5", 1])]))),
    ("invalid_tensor", "element 0 ([1])", _json_req(
        _doc([_tensor(datatype="FP32", data=[[1], [2]])]))),
    ("invalid_tensor", "value 128 is out of range for INT8", _json_req(
        _doc([_tensor(datatype="INT8", data=[-128, 128])]))),
    ("invalid_tensor", "value -1 is out of range for UINT64", _json_req(
        _doc([_tensor(datatype="UINT64", data=[-1, 2**64 - 1])]))),
    ("invalid_tensor", "value 18446744073709551616", _json_req(
        _doc([_tensor(datatype="UINT64", data=[0, 2**64])]))),
    ("invalid_tensor", "overflows FP16", _json_req(
        _doc([_tensor(datatype="FP16", data=[1.0, 70000.0])]))),
    ("invalid_tensor", "out of range for FP64", _json_req(
        _doc([_tensor(datatype="FP64", data=[1.0, 10**400])]))),
    ("invalid_tensor", "BOOL bytes must be 0 or 1", _bin_req(
        _doc([_tensor(datatype="BOOL", data=_MISSING, parameters={"binary_data_size": 2})]),
        b"\x01\x02")),
    ("invalid_tensor", "binary_data_size '8'", _bin_req(
        _doc([_tensor(data=_MISSING, parameters={"binary_data_size": "8"})]), bytes(8))),
    ("invalid_tensor", "binary_data_size True", _bin_req(
        _doc([_tensor(datatype="BOOL", shape=[1], data=_MISSING,
                      parameters={"binary_data_size": True})]), b"\x01")),
    ("invalid_tensor", "parameters must be", _json_req(_doc([_tensor(parameters=[])]))),
    ("invalid_tensor", "requested output 'y': binary_data", _json_req(
        _doc([], outputs=[{"name": "y", "parameters": {"binary_data": 1}}]))),
    ("invalid_tensor", "requested output #0 name", _json_req(_doc([], outputs=[{}]))),
    ("invalid_shape", "input 'x': shape must be a list", _json_req(_doc([_tensor(shape="2")]))),
    ("invalid_shape", "non-negative", _json_req(_doc([_tensor(shape=[-1])]))),
    ("invalid_shape", "non-negative", _json_req(_doc([_tensor(shape=[2.0])]))),
    ("invalid_shape", "non-negative", _json_req(_doc([_tensor(shape=[True, 2])]))),
    ("invalid_shape", "rank 4 exceeds", _json_req(_doc([_tensor(shape=[1, 1, 1, 2])]), SMALL)),
    ("invalid_shape", "shape must be a list", _json_req(_doc([_tensor(shape=_MISSING)]))),
    ("invalid_datatype", "'FLOAT32' is not an OIP", _json_req(
        _doc([_tensor(datatype="FLOAT32")]))),
    ("invalid_datatype", "input 'x': datatype must be", _json_req(_doc([_tensor(datatype=5)]))),
    ("invalid_datatype", "datatype must be", _json_req(_doc([_tensor(datatype=_MISSING)]))),
    ("unsupported_datatype", "input 'x': datatype BYTES", _json_req(
        _doc([_tensor(datatype="BYTES", data=["a", "b"])]))),
    ("size_mismatch", "data has 3 elements, shape [2] needs 2", _json_req(
        _doc([_tensor(data=[1, 2, 3])]))),
    ("size_mismatch", "does not match shape [2, 3] at depth 0", _json_req(
        _doc([_tensor(shape=[2, 3], data=[[1, 2], [3, 4], [5, 6]])]))),
    ("size_mismatch", "does not match shape [2, 2] at depth 1", _json_req(
        _doc([_tensor(shape=[2, 2], data=[[1, 2], 3])]))),
    ("size_mismatch", "binary_data_size 4 but INT32 shape [2] is 8", _bin_req(
        _doc([_tensor(data=_MISSING, parameters=BIN4)]), bytes(4))),
    ("size_mismatch", "declare 8 bytes, the body carries 9", _bin_req(
        _doc([_tensor(data=_MISSING, parameters={"binary_data_size": 8})]), bytes(9))),
    ("size_mismatch", "declare 8 bytes, the body carries 7", _bin_req(
        _doc([_tensor(data=_MISSING, parameters={"binary_data_size": 8})]), bytes(7))),
    ("size_mismatch", "declare 8 bytes, the body carries 0", _json_req(
        _doc([_tensor(data=_MISSING, parameters={"binary_data_size": 8})]))),
    ("size_mismatch", "declare 0 bytes, the body carries 3", _bin_req(_doc([]), b"abc")),
    ("too_many_tensors", "5 inputs exceed the limit of 4", _json_req(
        _doc([_tensor(name=f"x{i}") for i in range(5)]), SMALL)),
    ("too_many_tensors", "5 requested outputs", _json_req(
        _doc([], outputs=[{"name": f"y{i}"} for i in range(5)]), SMALL)),
    ("tensor_too_large", "input 'x': shape [268435457]", _json_req(
        _doc([_tensor(shape=[(1 << 28) + 1], data=[])]))),
    ("tensor_too_large", "exceeds 100 elements", _json_req(
        _doc([_tensor(shape=[0, 20, 20], data=[])]), SMALL)),
    ("tensor_too_large", "input 'x3': tensors exceed 256 bytes in total", _json_req(
        _doc([_tensor(name=f"x{i}", datatype="FP64", shape=[10], data=[0.5] * 10)
              for i in range(4)]), SMALL)),
    ("tensor_too_large", "257 bytes of binary", _bin_req(_doc([]), bytes(257), SMALL)),
    ("duplicate_input", "input 'x' appears twice", _json_req(_doc([_tensor(), _tensor()]))),
    ("duplicate_output", "requested output 'y' appears twice", _json_req(
        _doc([], outputs=[{"name": "y"}, {"name": "y"}]))),
]  # fmt: skip


@pytest.mark.parametrize(
    ("code", "fragment", "call"), ERROR_CASES, ids=[f"{c[0]}-{c[1][:30]}" for c in ERROR_CASES]
)
def test_request_errors(code: str, fragment: str, call: Callable[[], object]) -> None:
    assert code in ERROR_CODES
    _expect(code, fragment, call)


def test_every_error_code_is_exercised() -> None:
    exercised = {case[0] for case in ERROR_CASES} | {"invalid_response"}
    assert exercised == ERROR_CODES


def _json_resp(doc: Any) -> Callable[[], object]:
    return lambda: parse_infer_response(json.dumps(doc).encode(), None, LIMITS)


RESPONSE_OUT = {"name": "y", "datatype": "FP32", "shape": [1], "data": [0.5]}


@pytest.mark.parametrize(
    ("code", "fragment", "call"),
    [
        ("invalid_response", "JSON object", _json_resp([1])),
        ("invalid_response", "model_name", _json_resp({"outputs": []})),
        ("invalid_response", "model_version", _json_resp(
            {"model_name": "m", "model_version": 1, "outputs": []})),
        ("invalid_response", "response id", _json_resp(
            {"model_name": "m", "id": [], "outputs": []})),
        ("invalid_response", "no outputs", _json_resp({"model_name": "m"})),
        ("invalid_response", "outputs must be a list", _json_resp(
            {"model_name": "m", "outputs": "y"})),
        ("duplicate_output", "output 'y' appears twice", _json_resp(
            {"model_name": "m", "outputs": [RESPONSE_OUT, RESPONSE_OUT]})),
        ("invalid_tensor", "output 'y': element 0", _json_resp(
            {"model_name": "m", "outputs": [{**RESPONSE_OUT, "data": [None]}]})),
        ("size_mismatch", "declare 4 bytes, the body carries 0", _json_resp(
            {"model_name": "m", "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [1], "parameters": BIN4}]})),
    ],
)  # fmt: skip
def test_response_errors(code: str, fragment: str, call: Callable[[], object]) -> None:
    _expect(code, fragment, call)


def test_encode_rejects_unsupported_arrays() -> None:
    _expect("unsupported_datatype", "<U1", lambda: encode_infer_request({"s": np.array(["a"])}))
    _expect("unsupported_datatype", "complex128", lambda: encode_infer_response(
        "m", None, None, {"c": np.array([1j])}, ()))  # fmt: skip


# --------------------------------------------------------------------------- properties

_SUPPORTED_DTYPES = [
    *DATATYPES.values(),
    *(dt.newbyteorder(">") for dt in DATATYPES.values() if dt.itemsize > 1),
]
_arrays = st.sampled_from(_SUPPORTED_DTYPES).flatmap(
    lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
    )
)
_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
_tensor_maps = st.dictionaries(_names, _arrays, min_size=0, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=_tensor_maps, binary=st.booleans(), request_id=st.none() | _names)
def test_property_request_round_trip(
    inputs: dict[str, Array], binary: bool, request_id: str | None
) -> None:
    body, headers = encode_infer_request(inputs, binary=binary, request_id=request_id)
    request = _request(body, headers)
    assert request.id == request_id
    assert [i.name for i in request.inputs] == list(inputs)
    for parsed in request.inputs:
        assert parsed.shape == inputs[parsed.name].shape
        _assert_bit_exact(parsed.array, inputs[parsed.name], json_nan=not binary)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(outputs=_tensor_maps, data=st.data())
def test_property_response_round_trip(outputs: dict[str, Array], data: st.DataObject) -> None:
    binary = data.draw(st.sets(st.sampled_from(list(outputs))) if outputs else st.just(set()))
    body, headers = encode_infer_response("model", "3", None, outputs, binary)
    response = _response(body, headers)
    assert list(response.outputs) == list(outputs)
    for name, array in outputs.items():
        _assert_bit_exact(response.outputs[name], array, json_nan=name not in binary)


def _only_protocol_errors(body: bytes, length: int | None, limits: TensorLimits) -> None:
    """Both parsers either succeed or raise a ProtocolError with a documented code."""
    for parse in (parse_infer_request, parse_infer_response):
        try:
            parse(body, length, limits)
        except ProtocolError as exc:
            if exc.code not in ERROR_CODES:
                raise AssertionError(f"undocumented code {exc.code}") from exc


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)
_header_lengths = st.none() | st.integers(min_value=-3, max_value=300)


@settings(max_examples=500, deadline=None)
@given(body=st.binary(max_size=300), header_length=_header_lengths)
def test_fuzz_arbitrary_bytes(body: bytes, header_length: int | None) -> None:
    _only_protocol_errors(body, header_length, SMALL)


@settings(max_examples=500, deadline=None)
@given(value=_json_values, tail=st.binary(max_size=64))
def test_fuzz_arbitrary_json(value: Any, tail: bytes) -> None:
    head = json.dumps(value).encode()
    _only_protocol_errors(head, None, SMALL)
    _only_protocol_errors(head + tail, len(head), SMALL)
    try:
        parse_error(head)
    except ProtocolError as exc:
        if exc.code not in ERROR_CODES:
            raise AssertionError(f"undocumented code {exc.code}") from exc


_fields = {
    "name": st.sampled_from(["x", "y", "", 3, None, "\ud800", "z" * 9]),
    "datatype": st.sampled_from([*DATATYPES, "BYTES", "fp32", 1, None]),
    "shape": st.lists(st.integers(-2, 6) | st.sampled_from([True, 1.0, None]), max_size=4)
    | _json_values,
    "data": _json_values,
    "parameters": st.fixed_dictionaries(
        {}, optional={"binary_data_size": st.integers(-2, 64) | _json_values,
                      "binary_data": _json_values}
    ) | _json_values,
}  # fmt: skip
_tensor_objects = st.fixed_dictionaries({}, optional=_fields)


@settings(max_examples=600, deadline=None)
@given(
    tensors=st.lists(_tensor_objects, max_size=5),
    extra=st.fixed_dictionaries(
        {}, optional={"id": _json_values, "parameters": _json_values, "model_name": _names,
                      "model_version": _json_values}),
    tail=st.binary(max_size=96),
)  # fmt: skip
def test_fuzz_near_valid_messages(
    tensors: list[dict[str, Any]], extra: dict[str, Any], tail: bytes
) -> None:
    request_head = json.dumps({**extra, "inputs": tensors, "outputs": tensors}).encode()
    response_head = json.dumps({**extra, "outputs": tensors}).encode()
    for head in (request_head, response_head):
        _only_protocol_errors(head, None, SMALL)
        _only_protocol_errors(head + tail, len(head), SMALL)


@settings(max_examples=300, deadline=None)
@given(inputs=_tensor_maps, cut=st.integers(0, 10_000), flips=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))  # fmt: skip
def test_fuzz_mutated_valid_bodies(
    inputs: dict[str, Array], cut: int, flips: list[tuple[int, int]]
) -> None:
    body, headers = encode_infer_request(inputs)
    mutated = bytearray(body[: max(cut, len(body) // 2)])
    for position, value in flips:
        if mutated:
            mutated[position % len(mutated)] = value
    length = parse_header_length(headers[HEADER_LENGTH])
    _only_protocol_errors(bytes(mutated), length, LIMITS)
