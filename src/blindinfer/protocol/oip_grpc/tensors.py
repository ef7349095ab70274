"""OIP v2 gRPC inference messages <-> the typed objects the REST path uses.

A `ModelInferRequest` arrives as bytes and leaves this module as the same `InferRequest`
(`blindinfer.protocol.inference`) that REST parsing gives: names, shapes, datatypes and
totals are checked under the same `TensorLimits`, with the same error codes, and every
array is read-only, C-contiguous, aligned and exactly of the declared dtype and shape.

Tensor data comes either in `raw_input_contents` (one entry per input, in input order,
little-endian row-major bytes: what tritonclient sends) or in each input's typed
`contents` list. As in Triton, a request uses one or the other for all its inputs. Typed
contents follow the protocol's table (INT8/INT16/INT32 in `int_contents`, UINT8/UINT16/
UINT32 in `uint_contents`, ...); values that do not fit the datatype are refused, and
FP16 has no typed list, so it travels raw. BYTES is refused ("unsupported_datatype") as
on REST. Unknown parameters are ignored, as REST ignores unknown JSON keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from blindinfer.errors import ProtocolError
from blindinfer.protocol.datatypes import DATATYPES, datatype_to_dtype, dtype_to_datatype
from blindinfer.protocol.inference import (
    InferInput,
    InferRequest,
    RequestedOutput,
    _name,
    _parse_shape,
)
from blindinfer.protocol.limits import TensorLimits
from blindinfer.protocol.oip_grpc import oip_v2_pb2 as pb

__all__ = [
    "ParsedInfer",
    "encode_infer_response",
    "parse_infer_request",
    "parse_message",
]

_NDArray = npt.NDArray[Any]

# datatype -> the typed contents list that carries it (the protocol's table)
_CONTENTS_FIELD: Final = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_ALL_CONTENTS: Final = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)


class ParsedInfer:
    """A parsed ModelInferRequest: the model it names and the REST-shaped request."""

    __slots__ = ("model_name", "model_version", "request")

    def __init__(self, model_name: str, model_version: str | None, request: InferRequest):
        self.model_name = model_name
        self.model_version = model_version
        self.request = request


def parse_message(message_type: type[Any], data: bytes) -> Any:
    """`data` as a `message_type`, or ProtocolError("invalid_request"): never protobuf's
    own exception, whose text may quote the bytes."""
    message = message_type()
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise ProtocolError(
            "invalid_request", f"the request is not a valid {message_type.__name__}"
        ) from None
    return message


def parse_infer_request(data: bytes, limits: TensorLimits) -> ParsedInfer:
    """Bytes of a ModelInferRequest -> the model's name and version and an InferRequest."""
    message = parse_message(pb.ModelInferRequest, data)
    model_name = _name(message.model_name, "model_name", "invalid_request", limits)
    version = message.model_version
    model_version = _name(version, "model_version", "invalid_request", limits) if version else None
    request_id = _name(message.id, "request id", "invalid_request", limits) if message.id else None
    receipt = _bool_parameter(message.parameters, "receipt")
    inputs = _inputs(message, limits)
    outputs = _requested_outputs(message, limits)
    request = InferRequest(request_id, inputs, outputs, True, receipt)
    return ParsedInfer(model_name, model_version, request)


def _bool_parameter(parameters: Mapping[str, Any], key: str) -> bool:
    if key not in parameters:
        return False
    value = parameters[key]
    if value.WhichOneof("parameter_choice") != "bool_param":
        raise ProtocolError("invalid_request", f"parameters.{key} must be a bool_param")
    return bool(value.bool_param)


def _inputs(message: Any, limits: TensorLimits) -> tuple[InferInput, ...]:
    count = len(message.inputs)
    if count > limits.max_tensors:
        raise ProtocolError(
            "too_many_tensors", f"{count} inputs exceed the limit of {limits.max_tensors}"
        )
    raw = message.raw_input_contents
    if raw and len(raw) != count:
        raise ProtocolError(
            "invalid_request",
            f"raw_input_contents has {len(raw)} entries for {count} inputs: give one per input",
        )
    parsed: list[InferInput] = []
    names: set[str] = set()
    total = 0
    for index, tensor in enumerate(message.inputs):
        name = _name(tensor.name, f"input #{index} name", "invalid_tensor", limits)
        if name in names:
            raise ProtocolError("duplicate_input", f"input {name!r} appears twice")
        names.add(name)
        label = f"input {name!r}"
        dtype = datatype_to_dtype(tensor.datatype)
        shape, elements = _parse_shape(list(tensor.shape), label, limits)
        total += elements * dtype.itemsize
        if total > limits.max_total_bytes:
            raise ProtocolError(
                "tensor_too_large",
                f"{label}: tensors exceed {limits.max_total_bytes} bytes in total",
            )
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise ProtocolError(
                    "invalid_tensor", f"{label}: both contents and raw_input_contents"
                )
            array = _raw_array(raw[index], dtype, shape, elements, label)
        elif has_contents:
            array = _typed_array(tensor.contents, tensor.datatype, dtype, shape, elements, label)
        elif elements == 0:
            array = _frozen(np.empty(shape, dtype=dtype))
        else:
            raise ProtocolError(
                "invalid_tensor", f"{label}: neither contents nor raw_input_contents"
            )
        parsed.append(InferInput(name, tensor.datatype, shape, array))
    return tuple(parsed)


def _frozen(array: _NDArray) -> _NDArray:
    array.flags.writeable = False
    return array


def _raw_array(
    raw: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], elements: int, label: str
) -> _NDArray:
    expected = elements * dtype.itemsize
    if len(raw) != expected:
        raise ProtocolError(
            "size_mismatch",
            f"{label}: {len(raw)} bytes of raw contents, shape {list(shape)} needs {expected}",
        )
    if elements == 0:
        return _frozen(np.empty(shape, dtype=dtype))
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if not array.flags.aligned:
        array = _frozen(array.copy())
    if dtype.kind == "b" and int(array.view(np.uint8).max()) > 1:
        raise ProtocolError("invalid_tensor", f"{label}: BOOL bytes must be 0 or 1")
    return array


def _typed_array(
    contents: Any,
    datatype: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    elements: int,
    label: str,
) -> _NDArray:
    wanted = _CONTENTS_FIELD.get(datatype)
    if wanted is None:
        raise ProtocolError(
            "invalid_tensor", f"{label}: {datatype} has no typed contents; send it raw"
        )
    for other in _ALL_CONTENTS:
        if other != wanted and len(getattr(contents, other)):
            raise ProtocolError(
                "invalid_tensor", f"{label}: {datatype} data belongs in {wanted}, not {other}"
            )
    values = getattr(contents, wanted)
    if len(values) != elements:
        raise ProtocolError(
            "size_mismatch",
            f"{label}: contents has {len(values)} elements, shape {list(shape)} needs {elements}",
        )
    if dtype.kind in "iu" and dtype.itemsize < 4 and elements:
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise ProtocolError(
                "invalid_tensor", f"{label}: a value is out of range for {datatype}"
            )
        array = wide.astype(dtype)
    else:
        array = np.array(values, dtype=dtype)
    return _frozen(array.reshape(shape))  # a fresh array: C-contiguous, 0-d kept


def _requested_outputs(message: Any, limits: TensorLimits) -> tuple[RequestedOutput, ...]:
    count = len(message.outputs)
    if count > limits.max_tensors:
        raise ProtocolError(
            "too_many_tensors",
            f"{count} requested outputs exceed the limit of {limits.max_tensors}",
        )
    outputs: list[RequestedOutput] = []
    names: set[str] = set()
    for index, requested in enumerate(message.outputs):
        name = _name(requested.name, f"requested output #{index} name", "invalid_tensor", limits)
        if name in names:
            raise ProtocolError("duplicate_output", f"requested output {name!r} appears twice")
        names.add(name)
        outputs.append(RequestedOutput(name, True))  # gRPC outputs are always raw bytes
    return tuple(outputs)


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Mapping[str, npt.ArrayLike],
    receipt: Mapping[str, str] | None = None,
) -> bytes:
    """A ModelInferResponse with every output in `raw_output_contents` (little-endian,
    row-major), as tritonclient reads them. `receipt`: the signed receipt, as the JSON
    text of the flattened JWS in `parameters["receipt"].string_param`."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version)
    if request_id is not None:
        response.id = request_id
    if receipt is not None:
        text = json.dumps(dict(receipt), separators=(",", ":"), sort_keys=True)
        response.parameters["receipt"].string_param = text
    for name, value in outputs.items():
        array = np.asarray(value)
        datatype = dtype_to_datatype(array.dtype)
        # astype, not ascontiguousarray: that one turns a 0-d array into a 1-d one
        array = array.astype(DATATYPES[datatype], order="C", copy=False)
        tensor = response.outputs.add(name=name, datatype=datatype)
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(array.tobytes())
    data: bytes = response.SerializeToString()
    return data
