"""How large a response the outputs of a run would make, from their dtypes and shapes only.

Outputs are sized by the model, not by the request: a 99-byte model (a scalar Expanded to
a shape given as input) turns a 76-byte request into 64 M elements. The worker that ran the
model sizes its outputs with `response_bytes` before it sends them, and refuses them when
the server's `--max-response-bytes` would be exceeded, so that the server never receives,
copies or encodes them (see `WorkerPool`).

Binary outputs cost their raw bytes. JSON outputs cost what the server's encoder may write:
the bound per element is the longest text of one value of its datatype plus a comma (floats
are written as the shortest repr of the Python float, which for FP16/FP32 values is that of
the equivalent double, e.g. `-1.1754942106924411e-38`). A bound, not a measurement: values
are never read, so sizing costs nothing whatever the output holds; callers with big outputs
ask for binary data, which is 3 to 6 times smaller anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["JSON_ELEMENT_BYTES", "OutputEncoding", "response_bytes", "tensor_bytes"]

JSON_ELEMENT_BYTES: Final[Mapping[str, int]] = {
    "b1": 6,  # "false,"
    "i1": 5,  # "-128,"
    "u1": 4,  # "255,"
    "i2": 7,  # "-32768,"
    "u2": 6,  # "65535,"
    "i4": 12,  # "-2147483648,"
    "u4": 11,  # "4294967295,"
    "i8": 21,  # "-9223372036854775808,"
    "u8": 21,  # "18446744073709551615,"
    "f2": 24,  # as a double: "-5.960464477539063e-08,"; NaN/Infinity are shorter
    "f4": 24,  # as a double: "-1.1754942106924411e-38,"
    "f8": 25,  # "-2.2250738585072014e-308,"
}
"""Kind and item size of a dtype -> most bytes one element takes in the JSON encoding."""

_UNKNOWN_ELEMENT_BYTES: Final = 64
"""Per element of a dtype the encoder does not carry: it fails later, never cheaply."""

_TENSOR_OVERHEAD: Final = 128
"""`{"name":..,"datatype":"FP32","shape":[..],"data":[..]}` or `"parameters":{..}`, less
the name and the dimensions, which are counted by their length."""


@dataclass(frozen=True, slots=True)
class OutputEncoding:
    """How the server will encode each output: as binary data or as JSON.

    Mirrors an inference request's choice (`InferRequest.wants_binary`): the outputs the
    request names carry their own flag, the others `binary_default`. The default is all
    binary, as BlindAI's `/run` sends them.
    """

    binary_default: bool = True
    binary: Mapping[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)

    def to_wire(self) -> list[Any]:
        """A JSON-able form, for the header frame of a worker command."""
        return [self.binary_default, dict(self.binary)]

    @classmethod
    def from_wire(cls, value: object) -> OutputEncoding:
        """Reads `to_wire`'s form; None (an older caller) means all binary."""
        if value is None:
            return cls()
        if not (isinstance(value, list) and len(value) == 2):
            raise ValueError("malformed output encoding")
        default, names = value
        if type(default) is not bool or not isinstance(names, dict):
            raise ValueError("malformed output encoding")
        if not all(isinstance(k, str) and type(v) is bool for k, v in names.items()):
            raise ValueError("malformed output encoding")
        return cls(default, names)


def tensor_bytes(name: str, dtype: np.dtype[Any], shape: tuple[int, ...], binary: bool) -> int:
    """Most bytes one output takes in a response: its data and its description."""
    count = 1
    for dimension in shape:
        count *= dimension
    described = _TENSOR_OVERHEAD + 6 * len(name) + 21 * len(shape)  # 6: a \\u escape per char
    if binary:
        return described + count * dtype.itemsize
    per_element = JSON_ELEMENT_BYTES.get(f"{dtype.kind}{dtype.itemsize}")
    if per_element is None:
        per_element = max(_UNKNOWN_ELEMENT_BYTES, dtype.itemsize)
    return described + count * per_element


def response_bytes(outputs: Mapping[str, npt.NDArray[Any]], encoding: OutputEncoding) -> int:
    """Most bytes `outputs` take in a response encoded as `encoding` says (the envelope
    around them, a few hundred bytes of model name, id and receipt, is not counted)."""
    return sum(
        tensor_bytes(name, array.dtype, tuple(array.shape), encoding.is_binary(name))
        for name, array in outputs.items()
    )
