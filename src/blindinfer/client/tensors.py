"""Turning what users hold (numpy arrays, lists with dtype and shape, torch tensors) into
numpy arrays, without importing torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from blindinfer.errors import ProtocolError, UsageError
from blindinfer.protocol.datatypes import DATATYPES, dtype_to_datatype

ACCEPTED_DTYPES = (
    f"an Open Inference Protocol datatype ({', '.join(DATATYPES)}) or a numpy dtype "
    "('float32', np.float32, np.dtype('int64'), ...)"
)
_NOT_CARRIED = frozenset({"BYTES", "BF16"})  # OIP datatypes blindinfer does not carry


@dataclass(frozen=True, slots=True)
class Tensor:
    """Plain data with an explicit dtype and shape, e.g. Tensor([1, 2, 3, 4], "INT64", (2, 2)).

    `dtype`: an Open Inference Protocol datatype name (BOOL, UINT8..UINT64, INT8..INT64,
    FP16, FP32, FP64) or anything numpy takes for one of those ("int64", np.int64,
    np.dtype("<i8")); "FP32" and "float32" give the same tensor. Anything else raises
    `blindinfer.UsageError`, as does data that does not fill `shape`.
    """

    data: Sequence[Any]
    dtype: npt.DTypeLike
    shape: Sequence[int]

    def __post_init__(self) -> None:
        tensor_dtype(self.dtype)


def tensor_dtype(dtype: object) -> np.dtype[Any]:
    """The numpy dtype of an OIP datatype name or a numpy dtype; UsageError otherwise."""
    if isinstance(dtype, str) and dtype in DATATYPES:
        return DATATYPES[dtype]
    if isinstance(dtype, str) and dtype in _NOT_CARRIED:
        raise UsageError(
            f"dtype {dtype} is an Open Inference Protocol datatype that blindinfer does not "
            f"carry: use {ACCEPTED_DTYPES}"
        )
    if dtype is None:  # numpy would read None as float64
        raise UsageError(f"a Tensor needs a dtype: use {ACCEPTED_DTYPES}")
    try:
        resolved = np.dtype(cast("npt.DTypeLike", dtype))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"unknown dtype {dtype!r}: use {ACCEPTED_DTYPES}") from exc
    try:
        dtype_to_datatype(resolved)
    except ProtocolError as exc:
        raise UsageError(
            f"numpy dtype {resolved} cannot be sent (no OIP datatype): use {ACCEPTED_DTYPES}"
        ) from exc
    return resolved


def to_array(value: object) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Tensor):
        return _from_parts(value.data, value.dtype, value.shape)
    if isinstance(value, Mapping) and {"data", "dtype", "shape"} <= value.keys():
        return _from_parts(value["data"], value["dtype"], value["shape"])
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):
        array = value.detach().cpu().numpy()
        return np.asarray(array)
    if isinstance(value, np.generic):
        return np.asarray(value)
    raise UsageError(
        f"cannot send a {type(value).__name__}: use a numpy array, a torch tensor, or "
        "blindinfer.Tensor(data, dtype, shape)"
    )


def _from_parts(data: Sequence[Any], dtype: object, shape: Sequence[int]) -> np.ndarray:
    resolved = tensor_dtype(dtype)
    try:
        array = np.asarray(data, dtype=resolved)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"the tensor's data are not {resolved} values: {exc}") from exc
    try:
        dims = tuple(int(d) for d in shape)
        return array.reshape(dims)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"the tensor's {array.size} values do not fit the shape {shape!r}: {exc}"
        ) from exc


def to_arrays(inputs: object, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """`inputs` is a dict by input name, or a single tensor for a one-input model."""
    if isinstance(inputs, Mapping) and not {"data", "dtype", "shape"} <= inputs.keys():
        return {str(name): to_array(value) for name, value in inputs.items()}
    if len(input_names) != 1:
        raise UsageError(
            f"this model takes {len(input_names)} inputs {list(input_names)}: pass a dict by name"
        )
    return {input_names[0]: to_array(inputs)}
