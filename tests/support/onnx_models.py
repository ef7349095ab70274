"""Small, real ONNX models built with ``onnx.helper`` for tests and benchmarks.

Why hand-built graphs: they are deterministic, instant to create, need no files on disk, and each
one isolates one concern of the server (every tensor dtype round-trips bit-exactly; several named
inputs/outputs with different dtypes and ranks; a realistic float MLP; malformed uploads).  Every
builder also has a numpy reference so tests can check values, not just shapes.

All models use ``OPSET`` / ``IR_VERSION`` below: old enough that any onnxruntime >= 1.20 (the
project's floor) loads them, new enough for every op used here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

DTYPES: tuple[str, ...] = (
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
)

# Which op produces "touched_<dtype>": chosen per dtype among ops that onnxruntime's CPU provider
# implements *and* that are bit-exact in numpy too (sign flip, modular +1, logical not), so the
# reference comparison can stay exact.  Neg has no unsigned kernels; Not exists only for bool.
TOUCH_OPS: dict[str, str] = {
    "float16": "Neg",
    "float32": "Neg",
    "float64": "Neg",
    "int8": "Neg",
    "int16": "Neg",
    "int32": "Neg",
    "int64": "Neg",
    "uint8": "AddOne",
    "uint16": "AddOne",
    "uint32": "AddOne",
    "uint64": "AddOne",
    "bool": "Not",
}

Array = npt.NDArray[Any]


def _finish(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="blindinfer-tests",
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    return model


def _elem_type(dtype: str) -> int:
    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Serialised model, i.e. exactly what a client uploads."""
    return bytes(model.SerializeToString())


def with_doc_string(model: onnx.ModelProto, text: str) -> onnx.ModelProto:
    """Copy of ``model`` with another doc_string: same graph, different bytes (and digest)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.doc_string = text
    return copy


# --------------------------------------------------------------------------------------------
# dtype identity


def dtype_identity_model() -> onnx.ModelProto:
    """One rank-2 dynamic input per dtype; ``out_<dt>`` = Identity, ``touched_<dt>`` = TOUCH_OPS.

    Each dtype gets its own symbolic dims (``<dt>_rows``, ``<dt>_cols``) so callers may feed
    arrays of unrelated shapes per dtype.  Outputs are ordered out_* (in DTYPES order) then
    touched_*.
    """
    nodes: list[onnx.NodeProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outs: list[onnx.ValueInfoProto] = []
    touched: list[onnx.ValueInfoProto] = []
    inits: list[onnx.TensorProto] = []
    for dt in DTYPES:
        et = _elem_type(dt)
        dims = [f"{dt}_rows", f"{dt}_cols"]
        src = f"in_{dt}"
        inputs.append(helper.make_tensor_value_info(src, et, dims))
        outs.append(helper.make_tensor_value_info(f"out_{dt}", et, dims))
        touched.append(helper.make_tensor_value_info(f"touched_{dt}", et, dims))
        nodes.append(helper.make_node("Identity", [src], [f"out_{dt}"], name=f"identity_{dt}"))
        op = TOUCH_OPS[dt]
        if op == "AddOne":
            one = f"one_{dt}"
            inits.append(numpy_helper.from_array(np.array(1, dtype=dt), one))
            nodes.append(helper.make_node("Add", [src, one], [f"touched_{dt}"], name=f"add_{dt}"))
        else:
            nodes.append(helper.make_node(op, [src], [f"touched_{dt}"], name=f"{op.lower()}_{dt}"))
    graph = helper.make_graph(nodes, "dtype_identity", inputs, outs + touched, inits)
    return _finish(graph, "identity + one exact op per tensor dtype")


def touched_reference(dtype: str, array: Array) -> Array:
    """What ``touched_<dtype>`` must equal for input ``array`` (bit-exact)."""
    op = TOUCH_OPS[dtype]
    with np.errstate(over="ignore"):
        if op == "Neg":
            return np.negative(array)
        if op == "AddOne":
            return np.asarray(array + np.array(1, dtype=dtype), dtype=dtype)
        return np.logical_not(array)


def dtype_identity_feed(rows: int = 3, cols: int = 5, seed: int = 0) -> dict[str, Array]:
    """Inputs for :func:`dtype_identity_model` spanning each dtype's full value range.

    Integers cover min/max (so wrap-around in Neg/AddOne is exercised); floats include
    inf/-inf/NaN/-0.0 so "identity" really means bit-identical.
    """
    rng = np.random.default_rng(seed)
    feed: dict[str, Array] = {}
    n = rows * cols
    for dt in DTYPES:
        dtype = np.dtype(dt)
        if dtype == np.bool_:
            arr = rng.integers(0, 2, n).astype(np.bool_)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            arr = rng.integers(int(info.min), int(info.max), n, dtype=dtype, endpoint=True)
            arr[: min(2, n)] = [info.min, info.max][: min(2, n)]
        else:
            arr = (rng.standard_normal(n) * 1000).astype(dtype)
            specials = np.array([np.inf, -np.inf, np.nan, -0.0], dtype=dtype)
            k = min(len(specials), n)
            arr[:k] = specials[:k]
        feed[f"in_{dt}"] = arr.reshape(rows, cols)
    return feed


# --------------------------------------------------------------------------------------------
# multi input / output

MULTI_IO_WEIGHT: npt.NDArray[np.float32] = np.array(
    [[1.0, -1.0, 0.5], [0.25, 2.0, -0.5], [-1.5, 0.0, 1.0], [0.75, 0.5, -2.0]], dtype=np.float32
)
MULTI_IO_BIAS: npt.NDArray[np.float32] = np.array([0.1, -0.2, 0.3], dtype=np.float32)
MULTI_IO_FILL = -1


def multi_io_model() -> onnx.ModelProto:
    """Three inputs of different dtypes/ranks, four outputs, shared dynamic ``batch`` dim.

    Inputs:  features float32 [batch, 4], ids int64 [batch], mask bool [batch].
    Outputs: logits float32 [batch, 3] (MatMul+Add), ids_float float32 [batch] (Cast),
             masked_ids int64 [batch] (Where(mask, ids, -1)), mask_count int64 [] (scalar:
             number of true mask entries, Cast+ReduceSum) -- a rank-0 output on purpose.
    """
    f32, i64, b = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    inputs = [
        helper.make_tensor_value_info("features", f32, ["batch", 4]),
        helper.make_tensor_value_info("ids", i64, ["batch"]),
        helper.make_tensor_value_info("mask", b, ["batch"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f32, ["batch", 3]),
        helper.make_tensor_value_info("ids_float", f32, ["batch"]),
        helper.make_tensor_value_info("masked_ids", i64, ["batch"]),
        helper.make_tensor_value_info("mask_count", i64, []),
    ]
    inits = [
        numpy_helper.from_array(MULTI_IO_WEIGHT, "W"),
        numpy_helper.from_array(MULTI_IO_BIAS, "B"),
        numpy_helper.from_array(np.array(MULTI_IO_FILL, dtype=np.int64), "fill"),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
        helper.make_node("Cast", ["ids"], ["ids_float"], to=f32),
        helper.make_node("Where", ["mask", "ids", "fill"], ["masked_ids"]),
        helper.make_node("Cast", ["mask"], ["mask_i64"], to=i64),
        helper.make_node("ReduceSum", ["mask_i64"], ["mask_count"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "multi_io", inputs, outputs, inits)
    return _finish(graph, "several named inputs and outputs of different dtypes")


def multi_io_feed(batch: int = 4, seed: int = 0) -> dict[str, Array]:
    """A valid feed for :func:`multi_io_model`."""
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((batch, 4)).astype(np.float32),
        "ids": rng.integers(-1000, 1000, batch, dtype=np.int64),
        "mask": rng.integers(0, 2, batch).astype(np.bool_),
    }


def multi_io_reference(feed: dict[str, Array]) -> dict[str, Array]:
    """Expected outputs of :func:`multi_io_model` (logits only approximately: float matmul)."""
    ids = feed["ids"]
    mask = feed["mask"]
    return {
        "logits": (feed["features"] @ MULTI_IO_WEIGHT + MULTI_IO_BIAS).astype(np.float32),
        "ids_float": ids.astype(np.float32),
        "masked_ids": np.where(mask, ids, np.int64(MULTI_IO_FILL)).astype(np.int64),
        "mask_count": np.array(np.count_nonzero(mask), dtype=np.int64),
    }


# --------------------------------------------------------------------------------------------
# MLP


def mlp_weights(
    in_features: int = 64, hidden: int = 256, out_features: int = 10, seed: int = 0
) -> dict[str, npt.NDArray[np.float32]]:
    """The MLP's parameters (He-style scaled normals), exposed for the numpy reference."""
    rng = np.random.default_rng(seed)
    return {
        "W1": (rng.standard_normal((in_features, hidden)) / np.sqrt(in_features)).astype(
            np.float32
        ),
        "b1": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
        "W2": (rng.standard_normal((hidden, out_features)) / np.sqrt(hidden)).astype(np.float32),
        "b2": (rng.standard_normal(out_features) * 0.1).astype(np.float32),
    }


def mlp_model(
    in_features: int = 64, hidden: int = 256, out_features: int = 10, seed: int = 0
) -> onnx.ModelProto:
    """x [batch, in_features] -> Linear -> Relu -> Linear -> Softmax -> probabilities."""
    w = mlp_weights(in_features, hidden, out_features, seed)
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h_mm"]),
        helper.make_node("Add", ["h_mm", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["o_mm"]),
        helper.make_node("Add", ["o_mm", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", f32, ["batch", in_features])],
        [helper.make_tensor_value_info("probabilities", f32, ["batch", out_features])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    return _finish(graph, f"mlp {in_features}-{hidden}-{out_features} seed {seed}")


def mlp_reference(
    x: npt.NDArray[np.float32],
    in_features: int = 64,
    hidden: int = 256,
    out_features: int = 10,
    seed: int = 0,
) -> npt.NDArray[np.float32]:
    """Numpy forward pass of :func:`mlp_model` with the same parameters (float64 internally)."""
    w = mlp_weights(in_features, hidden, out_features, seed)
    h = np.maximum(x.astype(np.float64) @ w["W1"] + w["b1"], 0.0)
    logits = h @ w["W2"] + w["b2"]
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# invalid uploads


def invalid_model_bytes() -> dict[str, bytes]:
    """Uploads that must be rejected, keyed by why they are bad.

    - ``empty``: zero bytes.
    - ``random``: 4 KiB of seeded random bytes (not a valid protobuf model).
    - ``truncated``: the first half of a valid serialised MLP.
    - ``unknown_op``: valid protobuf, passes parsing, but uses an op that exists nowhere.
    - ``dangling_input``: valid protobuf whose node reads a tensor nothing produces.
    - ``no_opset``: valid protobuf graph with no opset import at all.
    """
    valid = model_bytes(mlp_model(in_features=8, hidden=16, out_features=3))
    f32 = TensorProto.FLOAT

    def io(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, f32, ["N"])

    unknown = _finish(
        helper.make_graph(
            [helper.make_node("DefinitelyNotAnOnnxOp", ["x"], ["y"])], "bad", [io("x")], [io("y")]
        ),
        "unknown op",
    )
    dangling = _finish(
        helper.make_graph(
            [helper.make_node("Add", ["x", "ghost"], ["y"])], "bad", [io("x")], [io("y")]
        ),
        "node input 'ghost' is never defined",
    )
    no_opset = _finish(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "bad", [io("x")], [io("y")]),
        "no opset import",
    )
    del no_opset.opset_import[:]
    return {
        "empty": b"",
        "random": np.random.default_rng(1234).bytes(4096),
        "truncated": valid[: len(valid) // 2],
        "unknown_op": model_bytes(unknown),
        "dangling_input": model_bytes(dangling),
        "no_opset": model_bytes(no_opset),
    }
