"""Open Inference Protocol v2 (KServe v2 / Triton REST) inference messages.

Both directions of `POST /v2/models/<model>[/versions/<v>]/infer`: the request the client
encodes and the server parses, and the response the server encodes and the client parses.

Tensors travel either as JSON (`"data": [...]`, flat row-major or nested exactly as the
shape) or through Triton's binary tensor data extension: the body is a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw little-endian tensor bytes,
concatenated in tensor order; each binary tensor carries `parameters.binary_data_size`
instead of `data`. An output is requested in binary with `parameters.binary_data: true`
on the requested output, or for all outputs with the top-level
`parameters.binary_data_output: true`.

Parsing is "parse, don't validate": untrusted bytes become frozen dataclasses holding
read-only numpy arrays of the declared dtype and shape, once, under `TensorLimits`. The
parsers raise nothing but `ProtocolError`; the codes are listed in `ERROR_CODES`.

Decisions worth knowing:

- JSON is UTF-8, must be a single value, and may not repeat a key in an object (an
  ambiguity two JSON parsers could resolve differently). Unknown keys are ignored so that
  OIP extensions (e.g. other `parameters`) do not break us; known keys are type-checked.
- The non-standard JSON constants `NaN`, `Infinity` and `-Infinity` are accepted, as
  Python's json emits them: a JSON float tensor may legitimately contain them, and the
  encoder writes them for non-finite JSON outputs. They are floats, so they are rejected
  everywhere a float is (integer/bool tensors, shapes, binary_data_size).
- JSON element types are strict: BOOL takes only true/false, integer datatypes only JSON
  integers within the datatype's range, FP types JSON numbers (integers are converted).
  A finite number that overflows FP16/FP32 is rejected rather than turned into inf.
- JSON floats round-trip exactly (every FP16/FP32/FP64 value is an exact Python float and
  Python writes the shortest repr), except that a NaN's sign and payload are not kept:
  JSON has a single `NaN` token. Binary tensors are bit-exact, NaN payloads included.
- In binary, BOOL elements are one byte each and must be 0 or 1. Binary arrays are
  zero-copy views of the body when aligned, and copied when the header length leaves them
  unaligned, so every parsed array is C-contiguous and aligned for the runtime.
- A shape's dimensions are bounded one by one as well as by their product: the product of
  the non-zero dimensions must not exceed `max_elements`, even for an empty tensor,
  because numpy refuses shapes whose nominal extent overflows.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from blindinfer.errors import ProtocolError
from blindinfer.protocol import strict_json
from blindinfer.protocol.datatypes import DATATYPES, datatype_to_dtype, dtype_to_datatype
from blindinfer.protocol.limits import TensorLimits
from blindinfer.protocol.shown import shown as _shown

__all__ = [
    "CONTENT_TYPE_BINARY",
    "CONTENT_TYPE_JSON",
    "ERROR_CODES",
    "HEADER_LENGTH",
    "ErrorBody",
    "InferInput",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "encode_error",
    "encode_infer_request",
    "encode_infer_response",
    "parse_error",
    "parse_header_length",
    "parse_infer_request",
    "parse_infer_response",
]

HEADER_LENGTH: Final = "Inference-Header-Content-Length"
"""HTTP header giving the JSON header's length when binary tensor data follows it."""
CONTENT_TYPE_JSON: Final = "application/json"
CONTENT_TYPE_BINARY: Final = "application/octet-stream"

ERROR_CODES: Final = frozenset(
    {
        "malformed_json",  # not UTF-8 JSON, duplicate key, nested too deep
        "invalid_header_length",  # Inference-Header-Content-Length not in [0, len(body)]
        "header_too_large",  # JSON part larger than max_header_bytes
        "invalid_request",  # request envelope: not an object, bad id/inputs/outputs/params
        "invalid_response",  # response envelope: bad model_name/version/id/outputs
        "invalid_tensor",  # bad tensor object, name, data element type or value range
        "invalid_shape",  # shape not a list of non-negative ints, or rank too high
        "invalid_datatype",  # not an OIP datatype name
        "unsupported_datatype",  # an OIP datatype blindinfer does not carry (BYTES)
        "size_mismatch",  # element count or byte count disagrees with the shape or body
        "too_many_tensors",  # more than max_tensors inputs/outputs
        "tensor_too_large",  # max_elements or max_total_bytes exceeded
        "duplicate_input",  # two inputs share a name
        "duplicate_output",  # two (requested) outputs share a name
    }
)
"""Every `ProtocolError.code` the parsers of this module raise."""

_NDArray = npt.NDArray[Any]
_MAX_HEADER_LENGTH_DIGITS: Final = 19  # fits in int64; longer is nonsense for a length
_UNSPECIFIED_CODE: Final = "unspecified"


@dataclass(frozen=True, slots=True, eq=False)
class InferInput:
    """One parsed input: `array` is read-only, of `datatype`'s dtype and exactly `shape`.

    eq=False: comparing numpy arrays with == is elementwise, not a truth value.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: _NDArray


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client asked for; `binary` is already resolved against the default."""

    name: str
    binary: bool


@dataclass(frozen=True, slots=True, eq=False)
class InferRequest:
    """A parsed inference request.

    `outputs` empty means "all model outputs", each binary iff `binary_output_default`
    (the top-level `parameters.binary_data_output`).
    """

    id: str | None
    inputs: tuple[InferInput, ...]
    outputs: tuple[RequestedOutput, ...]
    binary_output_default: bool
    receipt: bool = False
    """`parameters.receipt: true`: the response carries a signed receipt."""

    def wants_binary(self, output_name: str) -> bool:
        """Whether `output_name` should be sent as binary data in the response."""
        for requested in self.outputs:
            if requested.name == output_name:
                return requested.binary
        return self.binary_output_default


@dataclass(frozen=True, slots=True, eq=False)
class InferResponse:
    """A parsed inference response; `outputs` keeps the wire order, arrays are read-only."""

    model_name: str
    model_version: str | None
    id: str | None
    outputs: dict[str, _NDArray]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """A parsed error body; `code` is "unspecified" for plain OIP `{"error": ...}` bodies."""

    code: str
    message: str


# --------------------------------------------------------------------------- parsing


def parse_header_length(value: str | None) -> int | None:
    """Parse the `Inference-Header-Content-Length` HTTP header value (None if absent).

    Only ASCII digits (after trimming HTTP whitespace) are accepted: `int()` would also
    take signs, underscores and non-ASCII digits, none of which a length should carry.
    """
    if value is None:
        return None
    text = value.strip(" \t")
    if not (0 < len(text) <= _MAX_HEADER_LENGTH_DIGITS and text.isascii() and text.isdigit()):
        raise ProtocolError("invalid_header_length", f"{HEADER_LENGTH} {_shown(value)}")
    return int(text)


def _loads(raw: bytes) -> object:
    """Decode bounded JSON bytes (NaN/Infinity allowed: see the module docstring)."""
    return strict_json.loads(raw, allow_nan=True)


def _split(body: bytes, header_length: int | None, limits: TensorLimits) -> tuple[object, int]:
    """Bound and parse the JSON part; return it and the offset where binary data starts."""
    if header_length is None:
        end = len(body)
    else:
        if type(header_length) is not int or not 0 <= header_length <= len(body):
            raise ProtocolError(
                "invalid_header_length",
                f"{HEADER_LENGTH} {_shown(header_length)} is not within the {len(body)}-byte body",
            )
        end = header_length
        if len(body) - end > limits.max_total_bytes:
            raise ProtocolError(
                "tensor_too_large",
                f"{len(body) - end} bytes of binary tensor data exceed the limit of "
                f"{limits.max_total_bytes}",
            )
    if end > limits.max_header_bytes:
        raise ProtocolError(
            "header_too_large",
            f"JSON header of {end} bytes exceeds the limit of {limits.max_header_bytes}",
        )
    return _loads(body[:end]), end


def _name(value: object, what: str, code: str, limits: TensorLimits) -> str:
    """A non-empty, bounded name that is valid Unicode (no lone surrogates)."""
    if not isinstance(value, str) or not value:
        raise ProtocolError(code, f"{what} must be a non-empty string, got {_shown(value)}")
    if len(value) > limits.max_name_length:
        raise ProtocolError(
            code, f"{what} {_shown(value)} is longer than {limits.max_name_length} characters"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ProtocolError(code, f"{what} {_shown(value)} is not valid Unicode") from exc
    return value


def _optional_name(
    doc: dict[str, Any], key: str, what: str, code: str, limits: TensorLimits
) -> str | None:
    """An optional string member (absent or null means None)."""
    value = doc.get(key)
    return None if value is None else _name(value, what, code, limits)


def _parameters(doc: dict[str, Any], what: str, code: str) -> dict[str, Any]:
    """The optional `parameters` object of `doc` (absent means empty)."""
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(code, f"{what}: parameters must be a JSON object")
    return params


def _parse_shape(value: object, label: str, limits: TensorLimits) -> tuple[tuple[int, ...], int]:
    """A bounded shape and its element count."""
    if not isinstance(value, list):
        raise ProtocolError("invalid_shape", f"{label}: shape must be a list, got {_shown(value)}")
    if len(value) > limits.max_rank:
        raise ProtocolError(
            "invalid_shape", f"{label}: rank {len(value)} exceeds the limit of {limits.max_rank}"
        )
    count = 1
    extent = 1  # product of the non-zero dims: numpy needs it to fit even for empty arrays
    for dim in value:
        if type(dim) is not int or dim < 0:
            raise ProtocolError(
                "invalid_shape",
                f"{label}: dimensions must be non-negative integers, got {_shown(value)}",
            )
        count *= dim
        extent *= max(dim, 1)
        if extent > limits.max_elements:
            raise ProtocolError(
                "tensor_too_large",
                f"{label}: shape {_shown(value)} exceeds {limits.max_elements} elements",
            )
    return tuple(value), count


def _flatten(data: list[Any], shape: tuple[int, ...], label: str) -> list[Any]:
    """Row-major elements of `data`, which is either flat or nested exactly as `shape`."""
    count = 1
    for dim in shape:
        count *= dim
    if len(shape) < 2 or not data or not isinstance(data[0], list):
        if len(data) != count:
            raise ProtocolError(
                "size_mismatch",
                f"{label}: data has {len(data)} elements, shape {list(shape)} needs {count}",
            )
        return data
    level: list[Any] = [data]
    for depth, dim in enumerate(shape):
        nested: list[Any] = []
        for item in level:
            if not isinstance(item, list) or len(item) != dim:
                raise ProtocolError(
                    "size_mismatch",
                    f"{label}: nested data does not match shape {list(shape)} at depth {depth}",
                )
            nested.extend(item)
        level = nested
    return level


def _first_bad(flat: list[Any], ok: tuple[type, ...]) -> int | None:
    """Index of the first element whose exact type is not in `ok` (bool is not an int)."""
    if all(type(v) in ok for v in flat):
        return None
    return next(i for i, v in enumerate(flat) if type(v) not in ok)


def _json_array(
    data: list[Any], datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...], label: str
) -> _NDArray:
    """Convert JSON tensor data into a read-only array of `dtype` and `shape`, strictly."""
    flat = _flatten(data, shape, label)
    kind = dtype.kind
    ok: tuple[type, ...] = (bool,) if kind == "b" else (int,) if kind in "iu" else (float, int)
    bad = _first_bad(flat, ok)
    if bad is not None:
        raise ProtocolError(
            "invalid_tensor",
            f"{label}: element {bad} ({_shown(flat[bad])}) is not a valid {datatype} value",
        )
    if kind in "iu" and flat:
        info = np.iinfo(dtype)
        low, high = min(flat), max(flat)
        if low < info.min or high > info.max:
            culprit = low if low < info.min else high
            raise ProtocolError(
                "invalid_tensor", f"{label}: value {_shown(culprit)} is out of range for {datatype}"
            )
    if kind == "f":
        try:
            wide = np.array(flat, dtype=np.float64)
        except OverflowError as exc:
            raise ProtocolError(
                "invalid_tensor", f"{label}: an integer is out of range for {datatype}"
            ) from exc
        if dtype.itemsize < wide.dtype.itemsize:
            with np.errstate(over="ignore"):
                array = wide.astype(dtype)
            if bool((np.isinf(array) & np.isfinite(wide)).any()):
                raise ProtocolError(
                    "invalid_tensor", f"{label}: a finite value overflows {datatype}"
                )
        else:
            array = wide
    else:
        array = np.array(flat, dtype=dtype)
    array = array.reshape(shape)
    array.flags.writeable = False
    return array


@dataclass(frozen=True, slots=True)
class _Pending:
    """A tensor whose header is parsed; `array` is None until its binary data is sliced."""

    name: str
    datatype: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    count: int
    binary_size: int | None
    array: _NDArray | None


def _parse_tensor(obj: object, role: str, index: int, limits: TensorLimits) -> _Pending:
    """Parse one input/output tensor object; JSON data is converted now, binary later."""
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_tensor", f"{role} #{index} must be a JSON object")
    name = _name(obj.get("name"), f"{role} #{index} name", "invalid_tensor", limits)
    label = f"{role} {name!r}"
    datatype = obj.get("datatype")
    if not isinstance(datatype, str):
        raise ProtocolError("invalid_datatype", f"{label}: datatype must be a string")
    try:
        dtype = datatype_to_dtype(datatype)
    except ProtocolError as exc:
        raise ProtocolError(exc.code, f"{label}: {exc.message}") from exc
    shape, count = _parse_shape(obj.get("shape"), label, limits)
    params = _parameters(obj, label, "invalid_tensor")
    has_data = "data" in obj
    if "binary_data_size" in params:
        if has_data:
            raise ProtocolError("invalid_tensor", f"{label}: both data and binary_data_size")
        size = params["binary_data_size"]
        if type(size) is not int:
            raise ProtocolError(
                "invalid_tensor", f"{label}: binary_data_size {_shown(size)} is not an integer"
            )
        if size != count * dtype.itemsize:
            raise ProtocolError(
                "size_mismatch",
                f"{label}: binary_data_size {_shown(size)} but {datatype} shape {list(shape)} "
                f"is {count * dtype.itemsize} bytes",
            )
        return _Pending(name, datatype, dtype, shape, count, size, None)
    if not has_data:
        raise ProtocolError("invalid_tensor", f"{label}: neither data nor binary_data_size")
    data = obj["data"]
    if not isinstance(data, list):
        raise ProtocolError("invalid_tensor", f"{label}: data must be a list")
    array = _json_array(data, datatype, dtype, shape, label)
    return _Pending(name, datatype, dtype, shape, count, None, array)


def _parse_tensors(
    raw: object, role: str, envelope_code: str, duplicate_code: str, limits: TensorLimits
) -> list[_Pending]:
    """Parse a list of tensor objects under the count, name and total-size limits."""
    if not isinstance(raw, list):
        raise ProtocolError(envelope_code, f"{role}s must be a list")
    if len(raw) > limits.max_tensors:
        raise ProtocolError(
            "too_many_tensors", f"{len(raw)} {role}s exceed the limit of {limits.max_tensors}"
        )
    pending: list[_Pending] = []
    names: set[str] = set()
    total = 0
    for index, obj in enumerate(raw):
        tensor = _parse_tensor(obj, role, index, limits)
        if tensor.name in names:
            raise ProtocolError(duplicate_code, f"{role} {tensor.name!r} appears twice")
        names.add(tensor.name)
        total += tensor.count * tensor.dtype.itemsize
        if total > limits.max_total_bytes:
            raise ProtocolError(
                "tensor_too_large",
                f"{role} {tensor.name!r}: tensors exceed {limits.max_total_bytes} bytes in total",
            )
        pending.append(tensor)
    return pending


def _materialize(body: bytes, start: int, pending: list[_Pending]) -> dict[str, _NDArray]:
    """Slice binary tensors out of `body` (after the header) once their sizes add up."""
    declared = sum(p.binary_size for p in pending if p.binary_size is not None)
    carried = len(body) - start
    if declared != carried:
        raise ProtocolError(
            "size_mismatch",
            f"binary tensors declare {declared} bytes, the body carries {carried} after the "
            "JSON header",
        )
    arrays: dict[str, _NDArray] = {}
    offset = start
    for p in pending:
        if p.array is not None:
            arrays[p.name] = p.array
            continue
        if p.count == 0:
            array = np.empty(p.shape, dtype=p.dtype)
            array.flags.writeable = False
        else:
            array = np.frombuffer(body, dtype=p.dtype, count=p.count, offset=offset)
            array = array.reshape(p.shape)
            if not array.flags.aligned:  # header lengths are arbitrary; kernels want alignment
                array = array.copy()
                array.flags.writeable = False
            if p.dtype.kind == "b" and int(array.view(np.uint8).max()) > 1:
                raise ProtocolError("invalid_tensor", f"{p.name!r}: BOOL bytes must be 0 or 1")
        offset += p.count * p.dtype.itemsize
        arrays[p.name] = array
    return arrays


def parse_infer_request(
    body: bytes, header_length: int | None, limits: TensorLimits
) -> InferRequest:
    """Parse an inference request body.

    `header_length` is the `Inference-Header-Content-Length` value (see
    `parse_header_length`), None for a pure JSON body. Binary input arrays are read-only
    views of `body`.
    """
    doc, start = _split(body, header_length, limits)
    if not isinstance(doc, dict):
        raise ProtocolError("invalid_request", "the request must be a JSON object")
    request_id = _optional_name(doc, "id", "request id", "invalid_request", limits)
    params = _parameters(doc, "request", "invalid_request")
    binary_default = params.get("binary_data_output", False)
    if type(binary_default) is not bool:
        raise ProtocolError("invalid_request", "parameters.binary_data_output must be a boolean")
    receipt = params.get("receipt", False)
    if type(receipt) is not bool:
        raise ProtocolError("invalid_request", "parameters.receipt must be a boolean")
    if "inputs" not in doc:
        raise ProtocolError("invalid_request", "the request has no inputs")
    pending = _parse_tensors(doc["inputs"], "input", "invalid_request", "duplicate_input", limits)
    outputs = _parse_requested_outputs(doc.get("outputs", []), binary_default, limits)
    arrays = _materialize(body, start, pending)
    inputs = tuple(InferInput(p.name, p.datatype, p.shape, arrays[p.name]) for p in pending)
    return InferRequest(request_id, inputs, outputs, binary_default, receipt)


def _parse_requested_outputs(
    raw: object, binary_default: bool, limits: TensorLimits
) -> tuple[RequestedOutput, ...]:
    """The request's `outputs`: names and resolved binary flags, no duplicates."""
    if not isinstance(raw, list):
        raise ProtocolError("invalid_request", "outputs must be a list")
    if len(raw) > limits.max_tensors:
        raise ProtocolError(
            "too_many_tensors",
            f"{len(raw)} requested outputs exceed the limit of {limits.max_tensors}",
        )
    outputs: list[RequestedOutput] = []
    names: set[str] = set()
    for index, obj in enumerate(raw):
        label = f"requested output #{index}"
        if not isinstance(obj, dict):
            raise ProtocolError("invalid_tensor", f"{label} must be a JSON object")
        name = _name(obj.get("name"), f"{label} name", "invalid_tensor", limits)
        label = f"requested output {name!r}"
        if name in names:
            raise ProtocolError("duplicate_output", f"{label} appears twice")
        names.add(name)
        binary = _parameters(obj, label, "invalid_tensor").get("binary_data", binary_default)
        if type(binary) is not bool:
            raise ProtocolError("invalid_tensor", f"{label}: binary_data must be a boolean")
        outputs.append(RequestedOutput(name, binary))
    return tuple(outputs)


def parse_infer_response(
    body: bytes, header_length: int | None, limits: TensorLimits
) -> InferResponse:
    """Parse an inference response body under the same bounds as a request.

    Binary output arrays are read-only views of `body`.
    """
    doc, start = _split(body, header_length, limits)
    if not isinstance(doc, dict):
        raise ProtocolError("invalid_response", "the response must be a JSON object")
    model_name = _name(doc.get("model_name"), "model_name", "invalid_response", limits)
    model_version = _optional_name(
        doc, "model_version", "model_version", "invalid_response", limits
    )
    response_id = _optional_name(doc, "id", "response id", "invalid_response", limits)
    parameters = _parameters(doc, "response", "invalid_response")
    if "outputs" not in doc:
        raise ProtocolError("invalid_response", "the response has no outputs")
    pending = _parse_tensors(
        doc["outputs"], "output", "invalid_response", "duplicate_output", limits
    )
    arrays = _materialize(body, start, pending)
    return InferResponse(model_name, model_version, response_id, arrays, parameters)


def parse_error(body: bytes, limits: TensorLimits | None = None) -> ErrorBody:
    """Parse an error body: blindinfer's `{"error", "code"}` or a plain OIP `{"error"}`."""
    bounds = limits if limits is not None else TensorLimits()
    doc, _ = _split(body, None, bounds)
    if not isinstance(doc, dict) or not isinstance(doc.get("error"), str):
        raise ProtocolError("invalid_response", 'an error body must be {"error": "<message>"}')
    code = doc.get("code")
    return ErrorBody(code if isinstance(code, str) else _UNSPECIFIED_CODE, doc["error"])


# --------------------------------------------------------------------------- encoding


def _canonical(value: npt.ArrayLike) -> tuple[_NDArray, str]:
    """A C-contiguous little-endian array (no copy when it already is one) and its datatype."""
    array = np.asarray(value)
    datatype = dtype_to_datatype(array.dtype)
    return array.astype(DATATYPES[datatype], order="C", copy=False), datatype


def _dump(doc: dict[str, Any]) -> bytes:
    """Compact JSON; non-finite floats become NaN/Infinity/-Infinity (see module doc)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode("ascii")


def _finish(
    doc: dict[str, Any], chunks: list[memoryview], binary: bool
) -> tuple[bytes, dict[str, str]]:
    """Join header and binary chunks in one copy, with the matching HTTP headers."""
    head = _dump(doc)
    if not binary:
        return head, {"Content-Type": CONTENT_TYPE_JSON}
    body = b"".join([head, *chunks])  # views of the arrays: one copy, no tobytes()
    return body, {"Content-Type": CONTENT_TYPE_BINARY, HEADER_LENGTH: str(len(head))}


def _tensor_entry(
    name: str, value: npt.ArrayLike, binary: bool, chunks: list[memoryview]
) -> dict[str, Any]:
    """The JSON object of one tensor; binary data is appended to `chunks` instead."""
    array, datatype = _canonical(value)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        entry["parameters"] = {"binary_data_size": array.nbytes}
        chunks.append(array.data)
    else:
        entry["data"] = array.reshape(-1).tolist()
    return entry


_JSON_CHUNK_ELEMENTS: Final = 1 << 16


def _json_data(array: _NDArray) -> list[bytes]:
    """The flat JSON list of `array`'s elements, exactly as `_dump` writes it, in pieces.

    A response may hold millions of elements: one `tolist()` and one `json.dumps` of them
    are single C calls that hold the GIL for seconds (the server encodes big responses on
    a thread so that its event loop keeps serving) and build 32 bytes of Python objects
    per element. Piece by piece, other threads run in between and only one piece's
    objects exist at a time.
    """
    flat = array.reshape(-1)
    pieces = [b"["]
    for start in range(0, flat.size, _JSON_CHUNK_ELEMENTS):
        if start:
            pieces.append(b",")
        chunk = flat[start : start + _JSON_CHUNK_ELEMENTS].tolist()
        pieces.append(_dump_value(chunk)[1:-1])
    pieces.append(b"]")
    return pieces


def _dump_value(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=True).encode("ascii")


def _response_entry(
    name: str, value: npt.ArrayLike, binary: bool, chunks: list[memoryview]
) -> list[bytes]:
    """One output's JSON object, as pieces; JSON data is encoded in pieces (`_json_data`)."""
    array, datatype = _canonical(value)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        entry["parameters"] = {"binary_data_size": array.nbytes}
        chunks.append(array.data)
        return [_dump_value(entry)]
    # "data" is the last key: the object without it, then its data spliced in
    return [_dump_value(entry)[:-1], b',"data":', *_json_data(array), b"}"]


def encode_infer_request(
    inputs: Mapping[str, npt.ArrayLike],
    *,
    outputs: Sequence[str] | None = None,
    binary: bool = True,
    request_id: str | None = None,
    receipt: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """Encode an inference request; return the body and its HTTP headers.

    `receipt`: ask for a signed receipt (`parameters.receipt: true`).

    With `binary`, every input travels as binary data and every output is requested as
    binary (`binary_data_output` plus `binary_data` on each named output); otherwise the
    request is pure JSON and outputs come back as JSON. `outputs` None asks for all.
    Raises ProtocolError("unsupported_datatype") for an array OIP cannot carry.
    """
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    if binary or receipt:
        doc["parameters"] = {"binary_data_output": True} if binary else {}
        if receipt:
            doc["parameters"]["receipt"] = True
    chunks: list[memoryview] = []
    doc["inputs"] = [_tensor_entry(name, value, binary, chunks) for name, value in inputs.items()]
    if outputs is not None:
        doc["outputs"] = [
            {"name": name, "parameters": {"binary_data": True}} if binary else {"name": name}
            for name in outputs
        ]
    return _finish(doc, chunks, binary)


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Mapping[str, npt.ArrayLike],
    binary: Collection[str],
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode an inference response; return the body and its HTTP headers.

    Outputs named in `binary` travel as binary data (in `outputs` order), the others as
    JSON; names in `binary` that are not outputs are ignored, so the server may pass the
    set of names the request wanted in binary. Non-finite JSON floats are written as
    NaN/Infinity/-Infinity, as Python's json does and as `parse_infer_response` accepts.
    """
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)
    chunks: list[memoryview] = []
    # "outputs" is the last key: the envelope without it, then the outputs spliced in,
    # which gives the bytes json.dumps would give for the whole document.
    pieces = [_dump(doc)[:-1], b',"outputs":[']
    any_binary = False
    for index, (name, value) in enumerate(outputs.items()):
        as_binary = name in binary
        any_binary = any_binary or as_binary
        if index:
            pieces.append(b",")
        pieces += _response_entry(name, value, as_binary, chunks)
    pieces.append(b"]}")
    if not any_binary:
        return b"".join(pieces), {"Content-Type": CONTENT_TYPE_JSON}
    head_length = sum(len(piece) for piece in pieces)
    body = b"".join([*pieces, *chunks])  # views of the arrays: one copy, no tobytes()
    return body, {"Content-Type": CONTENT_TYPE_BINARY, HEADER_LENGTH: str(head_length)}


def encode_error(code: str, message: str) -> bytes:
    """An error body: OIP's `{"error": "<message>"}` plus a machine-readable "code"."""
    return _dump({"error": message, "code": code})
