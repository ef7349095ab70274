"""A model whose ``training_info`` hides an external data reference (issue 21 item 11)."""

from __future__ import annotations

from onnx import TensorProto, helper


def _external(name: str) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.FLOAT
    tensor.dims.extend([3])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "12")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def model_with_training_info(*, external_in: str | None) -> bytes:
    """An Identity model whose training_info has an initialization and an algorithm
    graph; `external_in` ("initialization" or "algorithm") puts an external initializer
    there, or in a Constant node's attribute ("algorithm-node")."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "served",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    info = model.training_info.add()
    initialization = helper.make_graph(
        [], "initialization", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])]
    )
    algorithm = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z"])],
        "algorithm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
    )
    if external_in == "initialization":
        initialization.initializer.append(_external("w"))
    elif external_in == "algorithm":
        algorithm.initializer.append(_external("hidden"))
    elif external_in == "algorithm-node":
        algorithm.node.append(helper.make_node("Constant", [], ["c"], value=_external("c")))
    info.initialization.CopyFrom(initialization)
    info.algorithm.CopyFrom(algorithm)
    return bytes(model.SerializeToString())
