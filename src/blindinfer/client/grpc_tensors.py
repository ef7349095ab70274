"""The client's OIP v2 gRPC messages: arrays into a ModelInferRequest, a ModelInferResponse
back into arrays under the very checks the HTTPS transport applies.

Why the answer goes through `protocol.inference.parse_infer_response`: a gRPC answer is the
same untrusted tensor description (names, datatypes, shapes, bytes) as the binary REST
answer, only framed by protobuf instead of a JSON header. Rebuilding that header from the
message and handing it with the raw bytes to the REST parser applies the same bounds
(`TensorLimits`), datatype and shape rules, BOOL byte check and duplicate-name check, in
one place, instead of a second parser that could drift from the first. Each output's
`binary_data_size` is the length of its own `raw_output_contents` entry, so a piece that
does not match its shape is refused even when the total would.

Only raw contents are read: inputs are sent in `raw_input_contents`, and an answer that
carries typed `contents` (or a different number of raw pieces than outputs) is refused.

Receipts: asked for with the bool parameter `receipt`; the server returns the flattened JWS
as JSON text in the answer's `parameters["receipt"].string_param`, read here with the strict
JSON parser under a bound, then checked by `client/receipts.py` as a REST receipt is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from blindinfer.client.models import ModelMetadata, TensorMetadata
from blindinfer.errors import ProtocolError
from blindinfer.protocol import strict_json
from blindinfer.protocol.datatypes import DATATYPES, dtype_to_datatype
from blindinfer.protocol.inference import parse_infer_response
from blindinfer.protocol.limits import TensorLimits
from blindinfer.protocol.oip_grpc import oip_v2_pb2 as pb

RECEIPT: Final = "receipt"
MAX_RECEIPT_CHARS: Final = 64 * 1024
"""A receipt is well under 2 KiB of JSON; anything near this is no receipt."""


def infer_request(
    model: str,
    arrays: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None,
    receipt: bool = False,
) -> Any:
    """A ModelInferRequest with every input in `raw_input_contents` (little-endian, C order,
    as the REST binary extension). Raises ProtocolError for a dtype OIP cannot carry."""
    request = pb.ModelInferRequest(model_name=model)
    if receipt:
        request.parameters[RECEIPT].bool_param = True
    for name, value in arrays.items():
        array = np.asarray(value)
        datatype = dtype_to_datatype(array.dtype)
        array = array.astype(DATATYPES[datatype], order="C", copy=False)
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(array.tobytes())
    for name in outputs or ():
        request.outputs.add().name = name
    return request


def infer_outputs(response: Any, limits: TensorLimits) -> dict[str, np.ndarray]:
    """The outputs of a ModelInferResponse by name, read-only, checked as REST answers are."""
    outputs = response.outputs
    raw = response.raw_output_contents
    if len(raw) != len(outputs):
        raise ProtocolError(
            "invalid_response",
            f"the answer has {len(outputs)} outputs but {len(raw)} raw_output_contents",
        )
    entries: list[dict[str, Any]] = []
    for index, tensor in enumerate(outputs):
        if tensor.HasField("contents"):
            raise ProtocolError(
                "invalid_response",
                f"output #{index} carries typed contents; blindinfer reads raw_output_contents",
            )
        entries.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": {"binary_data_size": len(raw[index])},
            }
        )
    header = json.dumps(
        {"model_name": response.model_name, "outputs": entries}, separators=(",", ":")
    ).encode()
    body = b"".join([header, *raw])
    return dict(parse_infer_response(body, len(header), limits).outputs)


def receipt_of(response: Any) -> object:
    """The receipt (a flattened JWS, still to be verified) the answer carries, or None."""
    if RECEIPT not in response.parameters:
        return None
    parameter = response.parameters[RECEIPT]
    if parameter.WhichOneof("parameter_choice") != "string_param":
        raise ProtocolError("invalid_receipt", "the receipt is not a string parameter")
    text = parameter.string_param
    if len(text) > MAX_RECEIPT_CHARS:
        raise ProtocolError("invalid_receipt", "the receipt is too large")
    try:
        return strict_json.loads(text.encode(), allow_nan=False)
    except ProtocolError as exc:
        raise ProtocolError("invalid_receipt", f"the receipt is not JSON: {exc.message}") from exc


def model_metadata(response: Any, limits: TensorLimits) -> ModelMetadata:
    """A ModelMetadataResponse as the `ModelMetadata` the REST answer gives; bounded."""

    def specs(items: Sequence[Any], role: str) -> tuple[TensorMetadata, ...]:
        if len(items) > limits.max_tensors:
            raise ProtocolError(
                "invalid_response", f"{len(items)} model {role}s exceed {limits.max_tensors}"
            )
        found = []
        for item in items:
            if len(item.shape) > limits.max_rank or len(item.name) > limits.max_name_length:
                raise ProtocolError("invalid_response", f"a model {role} is out of bounds")
            found.append(TensorMetadata(item.name, item.datatype, tuple(item.shape)))
        return tuple(found)

    if not response.name or len(response.name) > limits.max_name_length:
        raise ProtocolError("invalid_response", "the model metadata has no usable name")
    return ModelMetadata(
        response.name, specs(response.inputs, "input"), specs(response.outputs, "output")
    )
