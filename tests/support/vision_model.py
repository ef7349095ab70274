"""A vision workload without a network or torchvision: a ResNet-shaped conv net built here.

Why: the GPU benchmark and the GPU end-to-end test need a convolutional model (the kernels
a GPU accelerates most, cuDNN's algorithm choice, an NCHW batch of images), and the test
dependencies ship no vision weights. Random He-initialised weights do not classify anything,
but they cost exactly what trained ones of the same shape cost, and they keep activations
of order one through the layers, so CPU and GPU outputs can be compared with a relative
tolerance. Deterministic from `seed`.

Shape: conv 7x7/2 (3 -> 64), max-pool 3x3/2, then four stages of conv 3x3/2 + conv 3x3/1
(64 -> 128 -> 256 -> 512 -> 512 channels, ReLU after each), global average pool, dense
512 -> 1000: 9.9 M parameters (38 MiB serialized), ~1.4 GFLOP per 224 x 224 image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

Array = npt.NDArray[Any]

INPUT = "image"
OUTPUT = "logits"
CLASSES = 1000
STAGES = (128, 256, 512, 512)


def conv_net_model(seed: int = 0, *, stem: int = 64, stages: tuple[int, ...] = STAGES) -> bytes:
    """The serialized model: image FP32 [N, 3, H, W] -> logits FP32 [N, 1000]."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []

    def conv(x: str, c_in: int, c_out: int, kernel: int, stride: int) -> str:
        name = f"conv{len(weights)}"
        fan_in = c_in * kernel * kernel
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), (c_out, c_in, kernel, kernel))
        weights.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.w"))
        weights.append(numpy_helper.from_array(np.zeros(c_out, np.float32), f"{name}.b"))
        pad = kernel // 2
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.w", f"{name}.b"],
                [f"{name}.y"],
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        nodes.append(helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"]))
        return f"{name}.r"

    x = conv(INPUT, 3, stem, 7, 2)
    nodes.append(
        helper.make_node(
            "MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    x, channels = "pool", stem
    for width in stages:
        x = conv(x, channels, width, 3, 2)
        x = conv(x, width, width, 3, 1)
        channels = width
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], axis=1))
    dense = rng.normal(0.0, np.sqrt(1.0 / channels), (channels, CLASSES)).astype(np.float32)
    weights.append(numpy_helper.from_array(dense, "fc.w"))
    weights.append(numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fc.b"))
    nodes.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], [OUTPUT]))
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.doc_string = "blindinfer test conv net (random weights)"
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def conv_net_feed(batch: int = 4, size: int = 224, seed: int = 0) -> dict[str, Array]:
    """A batch of images, normalised the way ImageNet models expect (mean 0, std 1)."""
    rng = np.random.default_rng(seed)
    return {INPUT: rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
