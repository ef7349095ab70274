"""Models that attack the server that runs them, and sized models for the worker pool.

Why these: the worker pool (``blindinfer.runtime.workers``) promises that a model cannot
exhaust memory, hog a worker forever, crash the server or make it read a file. Each
builder here is the smallest model that tries one of those, built with ``onnx.helper`` so
that it is deterministic and costs nothing to create.

No model here reliably segfaults onnxruntime 1.2x (known crashers get fixed upstream), so
tests simulate a crash by killing a worker process mid-run (``WorkerPool.stats()`` pids).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from support.onnx_models import OPSET, mlp_model, model_bytes

GIB = 1 << 30
MIB = 1 << 20


def _finish(graph: onnx.GraphProto, doc: str) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], doc_string=doc)
    model.ir_version = 8
    return model_bytes(model)


def huge_allocation_model(nbytes: int = 100 * GIB) -> bytes:
    """x: FP32 [1] -> y = ReduceSum(Expand(x, [nbytes / 4 / 1024, 1024])): FP32 scalar.

    The Expand output is ``nbytes`` large and only exists at run time (x is an input, so no
    constant folding at load). The scalar output keeps the reply small: the allocation is
    the whole attack. 100 GiB fails on any ordinary host even without a limit (overcommit
    refuses it); pass a few GiB to show that the worker's own limit is what stops it.
    """
    rows = max(1, nbytes // 4 // 1024)
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["x", "shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
        ],
        "huge_allocation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array([rows, 1024], dtype=np.int64), "shape")],
    )
    return _finish(graph, f"allocates {rows * 4096} bytes at run time")


def slow_model(iterations: int = 1 << 40, size: int = 256) -> bytes:
    """x: FP32 [size, size] -> y: a Loop of ``iterations`` x (Tanh(MatMul(x, x))).

    About a millisecond per iteration: with the default trip count it runs for decades.
    Tanh keeps the values finite so that the work never degenerates into NaN shortcuts.
    """
    f32 = TensorProto.FLOAT
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state_in", "state_in"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", f32, [size, size]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", f32, [size, size]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip_count", "keep_going", "x"], ["y"], body=body)],
        "slow",
        [helper.make_tensor_value_info("x", f32, [size, size])],
        [helper.make_tensor_value_info("y", f32, [size, size])],
        [
            numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trip_count"),
            numpy_helper.from_array(np.array(True), "keep_going"),
        ],
    )
    return _finish(graph, f"{iterations} matmuls of {size}x{size}")


def corrupted_model() -> bytes:
    """A valid MLP behind one byte that no protobuf parser accepts.

    0x0F is field 1 with wire type 7, which does not exist: decoding fails at the first
    byte, whatever follows (truncation, by contrast, sometimes still parses).
    """
    return b"\x0f" + model_bytes(mlp_model(in_features=8, hidden=16, out_features=3))


def external_data_model(location: str = "../../etc/passwd") -> bytes:
    """x: FP32 [4] -> y = x + W, where W's bytes are "in" the file ``location``.

    onnxruntime would read that file relative to the model's directory (or the server's
    working directory for a model loaded from bytes) and serve its contents as weights.
    """
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [weight],
    )
    return _finish(graph, f"initializer W lives in {location}")


def large_initializer_model(nbytes: int = 64 * MIB, seed: int = 0) -> bytes:
    """x: FP32 [n] -> y = x * W, with W an FP32 initializer of ``nbytes`` (random, so that
    no compression or sharing could make it cheaper than its size)."""
    n = nbytes // 4
    weight = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "W"], ["y"])],
        "large_initializer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        [numpy_helper.from_array(weight, "W")],
    )
    return _finish(graph, f"{nbytes} bytes of weights")


EMBEDDING_SHAPE = (1, 128, 384)


def embedding_output_model() -> bytes:
    """x: FP32 [1, 128, 384] -> y = x * 2 + 1: a transformer-sized hidden-state output
    (192 KiB each way), to measure what crossing the worker pipe costs."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["doubled"]),
            helper.make_node("Add", ["doubled", "one"], ["y"]),
        ],
        "embedding_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(EMBEDDING_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(EMBEDDING_SHAPE))],
        [
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ],
    )
    return _finish(graph, "1x128x384 in and out")


def expand_output_model() -> bytes:
    """shape: INT64 [1] -> y = Expand(1.0, shape): FP32 [shape[0]], ones.

    The output attack of issue 21: the request names the output's size, so a 100-byte
    model and a 76-byte request ask for 64 M elements (256 MiB raw, ~256 MiB of JSON).
    No doc string: the model stays about 100 bytes, as in the attack.
    """
    graph = helper.make_graph(
        [helper.make_node("Expand", ["one", "shape"], ["y"])],
        "expand",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model_bytes(model)


def slow_load_model(chain: int = 300, size: int = 1024) -> bytes:
    """x: FP32 [1] -> y = x + sum(C^(2^chain)), C a constant [size, size] made at load.

    The load-time attack of issue 21: a model of a few KB whose constants onnxruntime folds
    while it builds the session (ConstantOfShape, then `chain` MatMuls of 2*size^3 flops
    each), so that loading it, not running it, takes tens of seconds (~50 ms per MatMul
    on one core at the default size). C is all zeros: no overflow, the same work.
    """
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["c0"],
            value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        )
    ]
    nodes += [helper.make_node("MatMul", [f"c{i}", f"c{i}"], [f"c{i + 1}"]) for i in range(chain)]
    nodes += [
        helper.make_node("ReduceSum", [f"c{chain}"], ["total"], keepdims=0),
        helper.make_node("Add", ["x", "total"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow_load",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.array([size, size], dtype=np.int64), "shape")],
    )
    return _finish(graph, f"{chain} constant matmuls of {size}x{size}, folded at load")
