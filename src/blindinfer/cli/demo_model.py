"""The model that ``blindinfer demo`` uploads and runs on a fresh machine.

Why build it in code instead of shipping a file: the demo must work offline with nothing but
``onnx`` and ``numpy`` installed, and the bytes must be identical on every machine (weights come
from a fixed-seed ``numpy.random.default_rng``), so the model digest printed by the demo is
reproducible and can be compared with the digest the attested server reports.

The graph is a small real classifier: 16 float32 features -> Linear(32) -> Relu -> Linear(4)
-> Softmax ("scores") and ArgMax ("label", int64).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from onnx import TensorProto, helper, numpy_helper

SEED = 2024
IN_FEATURES = 16
HIDDEN = 32
CLASSES = 4
INPUT_NAME = "features"
OUTPUT_NAMES: tuple[str, str] = ("scores", "label")
# Old enough for every onnxruntime >= 1.20, which is the server extra's floor.
OPSET = 17
IR_VERSION = 8


def _weights() -> dict[str, npt.NDArray[np.float32]]:
    """Fixed-seed parameters: same seed and draw order give the same bytes everywhere."""
    rng = np.random.default_rng(SEED)
    return {
        "W1": (rng.standard_normal((IN_FEATURES, HIDDEN)) / np.sqrt(IN_FEATURES)).astype(
            np.float32
        ),
        "b1": (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32),
        "W2": (rng.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32),
        "b2": (rng.standard_normal(CLASSES) * 0.1).astype(np.float32),
    }


def demo_model() -> bytes:
    """Serialised demo classifier (deterministic bytes).

    Input ``features`` float32 [batch, 16]; outputs ``scores`` float32 [batch, 4] (softmax
    probabilities) and ``label`` int64 [batch] (argmax class index).
    """
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", [INPUT_NAME, "W1"], ["hidden_mm"], name="fc1_matmul"),
        helper.make_node("Add", ["hidden_mm", "b1"], ["hidden_pre"], name="fc1_bias"),
        helper.make_node("Relu", ["hidden_pre"], ["hidden"], name="fc1_relu"),
        helper.make_node("MatMul", ["hidden", "W2"], ["logits_mm"], name="fc2_matmul"),
        helper.make_node("Add", ["logits_mm", "b2"], ["logits"], name="fc2_bias"),
        helper.make_node("Softmax", ["logits"], ["scores"], name="softmax", axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=-1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "blindinfer_demo_classifier",
        [helper.make_tensor_value_info(INPUT_NAME, f32, ["batch", IN_FEATURES])],
        [
            helper.make_tensor_value_info("scores", f32, ["batch", CLASSES]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        [numpy_helper.from_array(value, name) for name, value in _weights().items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="blindinfer-demo",
        producer_version="1",
        doc_string=f"blindinfer demo classifier: {IN_FEATURES}-{HIDDEN}-{CLASSES} MLP, seed {SEED}",
    )
    model.ir_version = IR_VERSION
    return bytes(model.SerializeToString())


def demo_input(batch: int = 2) -> dict[str, npt.NDArray[np.float32]]:
    """A deterministic feed for :func:`demo_model` (seeded separately from the weights)."""
    rng = np.random.default_rng(SEED + 1)
    return {INPUT_NAME: rng.standard_normal((batch, IN_FEATURES)).astype(np.float32)}
