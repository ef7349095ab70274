"""BlindAI Core 0.6.3 request and reply schemas (CBOR maps), checked field by field.

Requests (the client sends every field; unknown extra fields are ignored, as serde did):

- upload: `{model: bytes | [uint8...], length: uint, model_name: text, optimize: bool,
  client_info: map}`
- run: `{model_id: text, model_hash: text, inputs: [tensor...], client_info: map | null}`
  with exactly one of model_id / model_hash non-empty
- delete: `{model_id: text}`

A tensor is `{info: {fact: [uint...], datum_type: uint 0..10, node_name: text | null},
bytes_data: bytes}`, the data little-endian. Replies: upload `{hash: bytes(32), model_id:
text}`, run `{outputs: [tensor...]}`, delete an empty body.

Model ids: BlindAI gave out UUIDs. A blindinfer model_id (`m-` + 32 hex) is shown to
BlindAI clients as the UUID with the same 128 bits, and both spellings are accepted back.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from blindinfer.errors import ProtocolError
from blindinfer.server.errors import PayloadTooLargeError
from blindinfer.store.errors import UnknownModelError
from blindinfer.store.names import is_model_id

MAX_INPUTS = 256
MAX_RANK = 32
MAX_DIMENSION = 2**63 - 1
"""ONNX dimensions are int64; so is what numpy allows for a shape's byte size."""
MAX_NAME_CHARS = 1024
CLIENT_INFO_KEYS = 16

# BlindAI's ModelDatumType, in its wire order.
DATUM_TYPES: tuple[np.dtype[Any], ...] = tuple(
    np.dtype(name)
    for name in (
        "<f4",
        "<f8",
        "<i4",
        "<i8",
        "<u4",
        "<u8",
        "u1",
        "<u2",
        "i1",
        "<i2",
        "?",
    )
)
_DATUM_BY_KIND = {(dtype.kind, dtype.itemsize): code for code, dtype in enumerate(DATUM_TYPES)}


def _invalid(message: str) -> ProtocolError:
    return ProtocolError("invalid_request", message)


def _text(document: Mapping[str, Any], key: str, *, default: str | None = None) -> str:
    value = document.get(key, default)
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
        raise _invalid(f"{key} must be a text string of at most {MAX_NAME_CHARS} characters")
    return value


def _check_client_info(document: Mapping[str, Any], *, required: bool) -> None:
    """Telemetry in BlindAI; here only type-checked and then dropped (never logged)."""
    info = document.get("client_info")
    if info is None and not required:
        return
    if not isinstance(info, dict) or len(info) > CLIENT_INFO_KEYS:
        raise _invalid("client_info must be a map")


@dataclass(frozen=True, slots=True)
class UploadRequest:
    model: bytes
    model_name: str
    optimize: bool


def parse_upload(document: Mapping[str, Any], max_model_bytes: int) -> UploadRequest:
    model = document.get("model")
    if not isinstance(model, bytes):
        raise _invalid("model must be a byte string or an array of integers 0-255")
    length = document.get("length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise _invalid("length must be a non-negative integer")
    if length > max_model_bytes:
        raise PayloadTooLargeError("Model is too big")
    if length == 0 or not model:
        raise _invalid("Received no data")
    if length != len(model):
        raise _invalid(f"length says {length} bytes but the model has {len(model)}")
    optimize = document.get("optimize", True)
    if not isinstance(optimize, bool):
        raise _invalid("optimize must be a boolean")
    name = _text(document, "model_name", default="")
    _check_client_info(document, required=False)
    return UploadRequest(model=model, model_name=name, optimize=optimize)


@dataclass(frozen=True, slots=True)
class InputTensor:
    name: str | None
    array: npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class RunRequest:
    ref: str  # a blindinfer model_id or a lower-case SHA-256
    inputs: tuple[InputTensor, ...]


def model_ref(model_id: str) -> str:
    """A BlindAI model_id (UUID, any case/braces form) or a native one, as a native id."""
    if is_model_id(model_id):
        return model_id
    try:
        return "m-" + uuid.UUID(model_id).hex
    except ValueError as exc:
        raise UnknownModelError("Model doesn't exist") from exc


def public_model_id(native_id: str) -> str:
    """The UUID spelling of a native model_id, as BlindAI clients expect."""
    return str(uuid.UUID(hex=native_id[2:]))


def parse_run(document: Mapping[str, Any], max_input_bytes: int) -> RunRequest:
    model_id = _text(document, "model_id", default="")
    model_hash = _text(document, "model_hash", default="")
    if not model_id and not model_hash:
        raise _invalid("You must provide at least one model_id or model_hash")
    if model_id and model_hash:
        raise _invalid("You cannot provide a model_id and a model_hash in the same time")
    if model_hash:
        ref = model_hash.lower()
        if len(ref) != 64 or any(c not in "0123456789abcdef" for c in ref):
            raise UnknownModelError("Model doesn't exist")
    else:
        ref = model_ref(model_id)
    _check_client_info(document, required=False)
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) > MAX_INPUTS:
        raise _invalid(f"inputs must be a list of at most {MAX_INPUTS} tensors")
    total = 0
    tensors = []
    for position, item in enumerate(inputs):
        tensor = parse_tensor(item, position)
        total += tensor.array.nbytes
        if total > max_input_bytes:
            raise PayloadTooLargeError("Input too big")
        tensors.append(tensor)
    return RunRequest(ref=ref, inputs=tuple(tensors))


def parse_tensor(item: object, position: int) -> InputTensor:
    where = f"inputs[{position}]"
    if not isinstance(item, dict):
        raise _invalid(f"{where} must be a map with info and bytes_data")
    info, data = item.get("info"), item.get("bytes_data")
    if not isinstance(info, dict) or not isinstance(data, bytes):
        raise _invalid(f"{where} must have an info map and bytes_data bytes")
    fact = info.get("fact")
    if (
        not isinstance(fact, list)
        or len(fact) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in fact)
    ):
        raise _invalid(f"{where}.info.fact must be a list of non-negative integers")
    code = info.get("datum_type")
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code < len(DATUM_TYPES):
        raise _invalid(f"{where}.info.datum_type must be an integer from 0 to 10")
    name = info.get("node_name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
        raise _invalid(f"{where}.info.node_name must be text or null")
    dtype = DATUM_TYPES[code]
    if any(d > MAX_DIMENSION for d in fact):
        raise _invalid(f"{where}.info.fact: a dimension is larger than {MAX_DIMENSION}")
    # numpy (and onnxruntime) bound the non-zero dimensions' product even for an empty
    # tensor: a shape such as [0, 2**62] describes no tensor any runtime can hold
    if math.prod(d for d in fact if d) * dtype.itemsize > MAX_DIMENSION:
        raise _invalid(
            f"{where}.info.fact: the shape has more elements than any tensor can hold "
            f"(its non-zero dimensions multiply to more than {MAX_DIMENSION} bytes)"
        )
    count = math.prod(fact)
    if count * dtype.itemsize != len(data):
        raise _invalid(
            f"{where}: shape {fact} of {dtype.name} needs {count * dtype.itemsize} bytes, "
            f"bytes_data has {len(data)}"
        )
    if dtype.kind == "b":  # as BlindAI: any non-zero byte is true
        array: npt.NDArray[Any] = np.frombuffer(data, dtype=np.uint8) != 0
    else:
        array = np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
    try:
        shaped = array.reshape(fact)
    except ValueError as exc:  # a limit of numpy's not checked above: still the caller's
        raise _invalid(f"{where}.info.fact: {fact} is not a shape numpy can hold") from exc
    return InputTensor(name=name, array=shaped)


def bind_inputs(inputs: Sequence[InputTensor], input_names: Sequence[str]) -> dict[str, Any]:
    """Named tensors go to their input; unnamed ones fill the remaining inputs in order
    (BlindAI's client leaves node_name empty when given a list of tensors)."""
    bound: dict[str, Any] = {}
    for tensor in inputs:
        if tensor.name is not None:
            if tensor.name not in input_names:
                raise _invalid(f"the model has no input named {tensor.name[:100]!r}")
            if tensor.name in bound:
                raise _invalid(f"input {tensor.name[:100]!r} is given twice")
            bound[tensor.name] = tensor.array
    free = [name for name in input_names if name not in bound]
    unnamed = [tensor for tensor in inputs if tensor.name is None]
    if len(unnamed) > len(free):
        raise _invalid(f"{len(unnamed)} unnamed inputs, but only {len(free)} inputs are left")
    for name, tensor in zip(free, unnamed, strict=False):
        bound[name] = tensor.array
    return bound


def encode_output(name: str, array: npt.NDArray[Any]) -> dict[str, Any]:
    code = _DATUM_BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ProtocolError(
            "unsupported_datatype",
            f"output {name[:100]!r} has type {array.dtype.name}, which BlindAI cannot carry",
        )
    wire = np.ascontiguousarray(array, dtype=DATUM_TYPES[code])
    return {
        "info": {"fact": list(array.shape), "datum_type": code, "node_name": name},
        "bytes_data": wire.tobytes(),
    }


def parse_delete(document: Mapping[str, Any]) -> str:
    model_id = _text(document, "model_id", default="")
    if not model_id:
        raise UnknownModelError("Model doesn't exist")
    return model_ref(model_id)
