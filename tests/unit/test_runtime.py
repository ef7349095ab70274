"""ModelSession: checked execution (exact error codes), refused models (invalid bytes,
external data wherever it hides) and the OIP signature of loaded models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from blindinfer.runtime.errors import InvalidModelError, InvalidTensorError
from blindinfer.runtime.session import ModelSession
from blindinfer.runtime.signature import TensorSpec

OPSET = 17


def _model(graph: onnx.GraphProto, *, functions: list[onnx.FunctionProto] | None = None) -> bytes:
    opsets = [helper.make_opsetid("", OPSET)]
    if functions:
        opsets.append(helper.make_opsetid("local", 1))
    model = helper.make_model(graph, opset_imports=opsets, functions=functions or [])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def add_model() -> bytes:
    """x: FP32 [batch, 3], k: INT64 [2, 2] -> y = x + [1, 2, 3] (FP32), z = -k (INT64)."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "c"], ["y"]),
            helper.make_node("Neg", ["k"], ["z"]),
        ],
        "add",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [2, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("z", TensorProto.INT64, [2, 2]),
        ],
        [numpy_helper.from_array(np.array([1, 2, 3], dtype=np.float32), "c")],
    )
    return _model(graph)


SESSION = ModelSession(add_model())
X = np.array([[0.5, 1.5, -3.0], [10.0, 20.0, 30.0]], dtype=np.float32)
K = np.array([[1, -2], [3, -4]], dtype=np.int64)


def test_signature_reports_oip_datatypes_and_dynamic_dims() -> None:
    assert SESSION.signature.inputs == (
        TensorSpec("x", "FP32", (-1, 3)),
        TensorSpec("k", "INT64", (2, 2)),
    )
    assert SESSION.signature.outputs == (
        TensorSpec("y", "FP32", (-1, 3)),
        TensorSpec("z", "INT64", (2, 2)),
    )
    assert SESSION.signature.output_names == ("y", "z")
    assert SESSION.signature.input("k") == TensorSpec("k", "INT64", (2, 2))
    assert SESSION.signature.input("nope") is None


def test_run_returns_exact_outputs() -> None:
    out = SESSION.run({"x": X, "k": K})
    assert list(out) == ["y", "z"]
    np.testing.assert_array_equal(out["y"], X + np.array([1, 2, 3], dtype=np.float32))
    assert out["y"].dtype == np.float32
    np.testing.assert_array_equal(out["z"], np.array([[-1, 2], [-3, 4]], dtype=np.int64))
    assert out["z"].dtype == np.int64


def test_run_selected_outputs_in_requested_order() -> None:
    out = SESSION.run({"x": X[:1], "k": K}, ["z"])
    assert list(out) == ["z"]
    out = SESSION.run({"x": X[:0], "k": K}, ["z", "y"])
    assert list(out) == ["z", "y"]
    assert out["y"].shape == (0, 3)


@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param({"x": X}, id="missing"),
        pytest.param({"x": X, "k": K, "extra": K}, id="extra"),
        pytest.param({"X": X, "k": K}, id="wrong-case"),
        pytest.param({}, id="none"),
    ],
)
def test_wrong_input_names(inputs: dict[str, np.ndarray]) -> None:
    with pytest.raises(InvalidTensorError) as info:
        SESSION.run(inputs)
    assert info.value.code == "wrong_inputs"


def test_wrong_inputs_message_names_missing_and_extra() -> None:
    with pytest.raises(InvalidTensorError) as info:
        SESSION.run({"x": X, "q": K})
    assert info.value.message == (
        "the model takes inputs ['k', 'x']; missing ['k'], unexpected ['q']"
    )


@pytest.mark.parametrize(
    ("x", "k"),
    [
        pytest.param(X.astype(np.float64), K, id="fp64-for-fp32"),
        pytest.param(X.astype(np.float16), K, id="fp16-for-fp32"),
        pytest.param(X, K.astype(np.int32), id="int32-for-int64"),
        pytest.param(X, K.astype(np.uint64), id="uint64-for-int64"),
        pytest.param(X.astype(np.int32), K, id="int32-for-fp32"),
    ],
)
def test_wrong_datatype(x: np.ndarray, k: np.ndarray) -> None:
    with pytest.raises(InvalidTensorError) as info:
        SESSION.run({"x": x, "k": k})
    assert info.value.code == "wrong_datatype"


def test_wrong_datatype_message() -> None:
    with pytest.raises(InvalidTensorError) as info:
        SESSION.run({"x": X.astype(np.float64), "k": K})
    assert info.value.message == "input 'x' must be FP32, got FP64"


def test_non_contiguous_input_gives_exact_results() -> None:
    strided = np.arange(12, dtype=np.float32).reshape(2, 6)[:, ::2]
    assert not strided.flags["C_CONTIGUOUS"]
    out = SESSION.run({"x": strided, "k": K})
    np.testing.assert_array_equal(out["y"], np.array([[1, 4, 7], [7, 10, 13]], np.float32))


# Regression (fixed in runtime/session.py): big-endian arrays were read as little-endian.
@pytest.mark.parametrize("which", ["x", "k"])
def test_big_endian_input_gives_exact_results(which: str) -> None:
    feed: dict[str, np.ndarray] = {"x": X, "k": K}
    feed[which] = feed[which].astype(feed[which].dtype.newbyteorder(">"))
    assert feed[which].dtype.byteorder == ">"
    out = SESSION.run(feed)
    np.testing.assert_array_equal(out["y"], X + np.array([1, 2, 3], dtype=np.float32))
    np.testing.assert_array_equal(out["z"], -K)


@pytest.mark.parametrize(
    ("x", "k"),
    [
        pytest.param(X.reshape(-1), K, id="rank-too-low"),
        pytest.param(X.reshape(1, 2, 3), K, id="rank-too-high"),
        pytest.param(np.zeros((2, 4), np.float32), K, id="fixed-dim"),
        pytest.param(X, K.reshape(4, 1), id="fixed-dims-both"),
        pytest.param(X, np.int64(3), id="scalar"),
    ],
)
def test_wrong_shape(x: np.ndarray, k: np.ndarray) -> None:
    with pytest.raises(InvalidTensorError) as info:
        SESSION.run({"x": x, "k": np.asarray(k)})
    assert info.value.code == "wrong_shape"


def test_wrong_shape_message() -> None:
    with pytest.raises(InvalidTensorError) as info:
        SESSION.run({"x": np.zeros((2, 4), np.float32), "k": K})
    assert info.value.message == "input 'x' must have shape [-1, 3] (-1 = any), got [2, 4]"


def test_dynamic_dim_accepts_any_size() -> None:
    for rows in (0, 1, 7):
        assert SESSION.run({"x": np.zeros((rows, 3), np.float32), "k": K})["y"].shape == (rows, 3)


@pytest.mark.parametrize("outputs", [["nope"], ["y", "nope"], ["Y"]])
def test_unknown_output(outputs: list[str]) -> None:
    with pytest.raises(InvalidTensorError) as info:
        SESSION.run({"x": X, "k": K}, outputs)
    assert info.value.code == "unknown_output"
    assert "outputs are ['y', 'z']" in info.value.message


def test_inference_failure_is_an_invalid_tensor_error() -> None:
    # Signature-valid inputs that onnxruntime itself refuses: Reshape to an impossible size.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    session = ModelSession(_model(graph))
    with pytest.raises(InvalidTensorError) as info:
        session.run({"x": np.zeros(5, np.float32), "shape": np.array([2, 2], np.int64)})
    assert info.value.code == "inference_failed"


# ----------------------------------------------------------------------------- refused models


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"this is not an ONNX model", id="text"),
        pytest.param(b"\xff" * 64, id="garbage"),
        pytest.param(add_model()[:-7], id="truncated"),
    ],
)
def test_invalid_bytes(data: bytes) -> None:
    with pytest.raises(InvalidModelError):
        ModelSession(data)


def test_model_without_graph() -> None:
    model = onnx.ModelProto()
    model.ir_version = 8
    with pytest.raises(InvalidModelError, match="it has no graph"):
        ModelSession(model.SerializeToString())


def test_unsupported_tensor_type_is_refused() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [1])],
    )
    with pytest.raises(InvalidModelError, match=r"tensor 's' has type tensor\(string\)"):
        ModelSession(_model(graph))


def _external(name: str, location: str = "../../etc/passwd", *, flag: bool = True) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.FLOAT
    tensor.dims.extend([3])
    if flag:
        tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "12")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _graph_with_initializer(initializer: TensorProto) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Add", ["x", initializer.name], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [initializer],
    )


def test_external_initializer_is_refused() -> None:
    with pytest.raises(InvalidModelError, match="external data") as info:
        ModelSession(_model(_graph_with_initializer(_external("weights"))))
    assert "'weights'" in str(info.value)


def test_external_data_entries_without_the_flag_are_refused() -> None:
    with pytest.raises(InvalidModelError, match="external data"):
        ModelSession(_model(_graph_with_initializer(_external("weights", flag=False))))


def test_external_tensor_in_a_constant_node_is_refused() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=_external("const")),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        "constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    with pytest.raises(InvalidModelError, match="external data"):
        ModelSession(_model(graph))


def _if_graph(*, nested: bool) -> onnx.GraphProto:
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["hidden"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [3])],
        [_external("hidden")],
    )
    if nested:  # the external tensor sits two If levels deep, in the else branch
        inner = helper.make_graph(
            [
                helper.make_node(
                    "If",
                    ["cond"],
                    ["inner_out"],
                    then_branch=_const_branch("t2"),
                    else_branch=then_branch,
                )
            ],
            "inner",
            [],
            [helper.make_tensor_value_info("inner_out", TensorProto.FLOAT, [3])],
        )
        then_branch = inner
    else_branch = _const_branch("e")
    return helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "if",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )


def _const_branch(prefix: str) -> onnx.GraphProto:
    return helper.make_graph(
        [
            helper.make_node(
                "Constant",
                [],
                [f"{prefix}_out"],
                value=numpy_helper.from_array(np.zeros(3, np.float32), f"{prefix}_zero"),
            )
        ],
        prefix,
        [],
        [helper.make_tensor_value_info(f"{prefix}_out", TensorProto.FLOAT, [3])],
    )


@pytest.mark.parametrize("nested", [False, True], ids=["if", "if-in-if"])
def test_external_tensor_inside_if_subgraph_is_refused(nested: bool) -> None:
    with pytest.raises(InvalidModelError, match="external data") as info:
        ModelSession(_model(_if_graph(nested=nested)))
    assert "'hidden'" in str(info.value)


def test_the_if_model_without_external_data_loads() -> None:
    # Control: the same graph shape with an embedded tensor is a valid, runnable model.
    graph = helper.make_graph(
        [
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                then_branch=_const_branch("t"),
                else_branch=_const_branch("e"),
            )
        ],
        "if",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    session = ModelSession(_model(graph))
    out = session.run({"cond": np.array(True)})
    np.testing.assert_array_equal(out["y"], np.zeros(3, np.float32))


def test_external_sparse_initializer_is_refused() -> None:
    values = _external("sparse_values")
    indices = numpy_helper.from_array(np.array([0, 1, 2], np.int64), "sparse_indices")
    sparse = helper.make_sparse_tensor(values, indices, [3])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "sparse_values"], ["y"])],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        sparse_initializer=[sparse],
    )
    with pytest.raises(InvalidModelError, match="external data"):
        ModelSession(_model(graph))


# Regression (fixed in runtime/external_data.py): model.functions were not walked.
def test_external_tensor_inside_a_model_local_function_is_refused() -> None:
    function = helper.make_function(
        "local",
        "AddHidden",
        ["a"],
        ["b"],
        [
            helper.make_node("Constant", [], ["k"], value=_external("in_function")),
            helper.make_node("Add", ["a", "k"], ["b"]),
        ],
        [helper.make_opsetid("", OPSET)],
    )
    graph = helper.make_graph(
        [helper.make_node("AddHidden", ["x"], ["y"], domain="local")],
        "function",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    with pytest.raises(InvalidModelError, match="external data") as info:
        ModelSession(_model(graph, functions=[function]))
    assert "'in_function'" in str(info.value)
