"""Turning what users hold (numpy arrays, lists with dtype and shape, torch tensors) into
numpy arrays, without importing torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Tensor:
    """Plain data with an explicit dtype and shape, e.g. Tensor([1, 2, 3, 4], "int64", (2, 2))."""

    data: Sequence[Any]
    dtype: str
    shape: Sequence[int]


def to_array(value: object) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Tensor):
        return _from_parts(value.data, value.dtype, value.shape)
    if isinstance(value, Mapping) and {"data", "dtype", "shape"} <= value.keys():
        return _from_parts(value["data"], str(value["dtype"]), value["shape"])
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):
        array = value.detach().cpu().numpy()
        return np.asarray(array)
    if isinstance(value, np.generic):
        return np.asarray(value)
    raise TypeError(
        f"cannot send a {type(value).__name__}: use a numpy array, a torch tensor, or "
        "blindinfer.Tensor(data, dtype, shape)"
    )


def _from_parts(data: Sequence[Any], dtype: str, shape: Sequence[int]) -> np.ndarray:
    array = np.asarray(data, dtype=np.dtype(dtype))
    return array.reshape(tuple(int(d) for d in shape))


def to_arrays(inputs: object, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """`inputs` is a dict by input name, or a single tensor for a one-input model."""
    if isinstance(inputs, Mapping) and not {"data", "dtype", "shape"} <= inputs.keys():
        return {str(name): to_array(value) for name, value in inputs.items()}
    if len(input_names) != 1:
        raise TypeError(
            f"this model takes {len(input_names)} inputs {list(input_names)}: pass a dict by name"
        )
    return {input_names[0]: to_array(inputs)}
