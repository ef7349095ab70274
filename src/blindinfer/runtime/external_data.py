"""Refuse ONNX models whose tensors live in external files.

onnxruntime resolves external data paths relative to the model location and would read
any file the server can read. blindinfer models are self-contained byte strings, so any
external reference is refused, wherever it hides (initializers, node attributes,
subgraphs of If/Loop/Scan, sparse initializers, model-local functions, and the
``initialization`` and ``algorithm`` graphs of ``training_info``, which inference runtimes
ignore today but a later one, or a tool an operator runs on the model, might load).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from blindinfer.runtime.errors import InvalidModelError

_EXTERNAL = 1  # onnx.TensorProto.EXTERNAL


def refuse_external_data(model_bytes: bytes) -> None:
    try:
        model = onnx.load_model_from_string(model_bytes)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidModelError(
            "the file is not a valid ONNX model (protobuf decoding failed)"
        ) from exc
    if not model.HasField("graph"):
        raise InvalidModelError("the file is not a valid ONNX model (it has no graph)")
    graphs = [
        model.graph,
        *(_FunctionNodes(f) for f in model.functions),
        *(info.initialization for info in model.training_info),
        *(info.algorithm for info in model.training_info),
    ]
    for tensor in (t for graph in graphs for t in _tensors(graph)):
        if tensor.data_location == _EXTERNAL or len(tensor.external_data) > 0:
            raise InvalidModelError(
                f"tensor {tensor.name!r} refers to external data; blindinfer only serves "
                "self-contained models"
            )


class _FunctionNodes:
    """A model-local function seen as a graph: nodes only, no initializers."""

    def __init__(self, function: Any) -> None:
        self.node = function.node
        self.initializer: list[Any] = []
        self.sparse_initializer: list[Any] = []


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)
