"""Open Inference Protocol datatypes, numpy dtypes and ONNX Runtime type strings.

One table is the single source of truth for which tensor element types blindinfer carries
over the wire, so that the codec, the server's model signature and the client agree.
Every dtype is little-endian because the binary tensor data extension is little-endian
on the wire (Triton's definition), whatever the host's byte order.

BYTES (variable-length strings, length-prefixed in binary) is deliberately unsupported:
its framing is a second, more error-prone parser and no model we serve needs it. It is
rejected with code "unsupported_datatype"; names that are not OIP datatypes at all are
rejected with "invalid_datatype", so a caller can tell "not yet" from "nonsense".
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from blindinfer.errors import ProtocolError
from blindinfer.protocol.shown import shown as _shown

__all__ = [
    "DATATYPES",
    "ONNX_TYPES",
    "datatype_to_dtype",
    "dtype_to_datatype",
    "onnx_to_datatype",
]

DATATYPES: Final[MappingProxyType[str, np.dtype[Any]]] = MappingProxyType(
    {
        "BOOL": np.dtype("?"),
        "UINT8": np.dtype("<u1"),
        "UINT16": np.dtype("<u2"),
        "UINT32": np.dtype("<u4"),
        "UINT64": np.dtype("<u8"),
        "INT8": np.dtype("<i1"),
        "INT16": np.dtype("<i2"),
        "INT32": np.dtype("<i4"),
        "INT64": np.dtype("<i8"),
        "FP16": np.dtype("<f2"),
        "FP32": np.dtype("<f4"),
        "FP64": np.dtype("<f8"),
    }
)
"""Supported OIP datatype name -> little-endian numpy dtype."""

ONNX_TYPES: Final[MappingProxyType[str, str]] = MappingProxyType(
    {
        "tensor(bool)": "BOOL",
        "tensor(uint8)": "UINT8",
        "tensor(uint16)": "UINT16",
        "tensor(uint32)": "UINT32",
        "tensor(uint64)": "UINT64",
        "tensor(int8)": "INT8",
        "tensor(int16)": "INT16",
        "tensor(int32)": "INT32",
        "tensor(int64)": "INT64",
        "tensor(float16)": "FP16",
        "tensor(float)": "FP32",
        "tensor(double)": "FP64",
    }
)
"""ONNX Runtime `NodeArg.type` string -> OIP datatype name, for supported types."""

_KNOWN_UNSUPPORTED: Final = frozenset({"BYTES", "BF16"})
_BY_KIND_SIZE: Final[dict[tuple[str, int], str]] = {
    (dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()
}


def datatype_to_dtype(datatype: str) -> np.dtype[Any]:
    """The little-endian numpy dtype of an OIP datatype name (exact, case-sensitive)."""
    if not isinstance(datatype, str):
        raise ProtocolError("invalid_datatype", f"{_shown(datatype)} is not an OIP datatype")
    dtype = DATATYPES.get(datatype)
    if dtype is not None:
        return dtype
    if datatype in _KNOWN_UNSUPPORTED:
        raise ProtocolError("unsupported_datatype", f"datatype {datatype} is not supported")
    raise ProtocolError("invalid_datatype", f"{_shown(datatype)} is not an OIP datatype")


def dtype_to_datatype(dtype: npt.DTypeLike) -> str:
    """The OIP datatype name of a numpy dtype, whatever its byte order.

    Raises ProtocolError("unsupported_datatype") for dtypes OIP cannot carry here
    (strings, objects, complex, float128, datetimes, structured...).
    """
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("unsupported_datatype", f"{_shown(dtype)} is not a dtype") from exc
    name = _BY_KIND_SIZE.get((dt.kind, dt.itemsize)) if dt.fields is None else None
    if name is None or dt.subdtype is not None:
        raise ProtocolError("unsupported_datatype", f"numpy dtype {dt} has no OIP datatype")
    return name


def onnx_to_datatype(onnx_type: str) -> str:
    """The OIP datatype name of an ONNX Runtime tensor type string such as "tensor(float)"."""
    name = ONNX_TYPES.get(onnx_type) if isinstance(onnx_type, str) else None
    if name is None:
        raise ProtocolError(
            "unsupported_datatype", f"ONNX type {_shown(onnx_type)} is not supported"
        )
    return name
