"""Open Inference Protocol v2: health, server and model metadata, inference."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import blindinfer
from blindinfer.protocol.inference import (
    InferRequest,
    encode_infer_response,
    parse_header_length,
    parse_infer_request,
)
from blindinfer.protocol.receipts import tensor_digest
from blindinfer.runtime.response_size import OutputEncoding
from blindinfer.server.auth import Action, Principal, sharing_view
from blindinfer.server.bodies import read_bounded
from blindinfer.server.body_guard import tenant_slot
from blindinfer.server.respond import BytesEndpoint, encode_outputs, tensor_bytes
from blindinfer.server.respond import json_response as _json
from blindinfer.server.respond import server_state as _state
from blindinfer.server.state import ServerState
from blindinfer.store.errors import UnknownModelError
from blindinfer.store.sealed import ModelRecord

MODEL_VERSION = "1"
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "model_repository", "attestation"]


def _model(request: Request, action: Action) -> ModelRecord:
    return _viewed_model(request, action)[1]


def _viewed_model(request: Request, action: Action) -> tuple[Principal, ModelRecord]:
    version = request.path_params.get("version")
    if version is not None and version != MODEL_VERSION:
        raise UnknownModelError(
            f"model version {version[:20]!r} does not exist; use {MODEL_VERSION!r}"
        )
    state = _state(request)
    principal = state.principal(request)
    return principal, state.model_for(principal, request.path_params["ref"], action)


async def server_metadata(request: Request) -> Response:
    document: dict[str, object] = {
        "name": "blindinfer",
        "version": blindinfer.__version__,
        "extensions": EXTENSIONS,
    }
    grpc_port = _state(request).config.grpc_port
    if grpc_port:  # a hint for clients; gRPC's TLS key is the attested one, pinned
        document["grpc_port"] = grpc_port
    return _json(document)


async def live(request: Request) -> Response:
    return _json({"live": True})


async def ready(request: Request) -> Response:
    return _json({"ready": True})


async def model_ready(request: Request) -> Response:
    _model(request, Action.READ_METADATA)
    return _json({"name": request.path_params["ref"], "ready": True})


async def model_metadata(request: Request) -> Response:
    principal, record = _viewed_model(request, Action.READ_METADATA)
    signature = await _state(request).registry.signature_async(record)  # no thread held
    # the owner only to its own tenant and admins, never to the tenants it is shared with
    owner, _ = sharing_view(principal, record.owner, record.shared_with)
    return _json(
        {
            "name": record.name,
            "versions": [MODEL_VERSION],
            "platform": (
                "onnxruntime_genai" if record.kind == "generative" else "onnxruntime_onnx"
            ),
            "inputs": [
                {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                for s in signature.inputs
            ],
            "outputs": [
                {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                for s in signature.outputs
            ],
            "parameters": {
                "model_id": record.model_id,
                "sha256": record.sha256,
                "size": record.size,
                "kind": record.kind,
                **({"owner": owner} if owner is not None else {}),
            },
        }
    )


async def _infer(request: Request) -> tuple[bytes, dict[str, str]]:
    state = _state(request)
    principal = state.principal(request)
    record = state.model_for(principal, request.path_params["ref"], Action.RUN)
    if request.path_params.get("version", MODEL_VERSION) != MODEL_VERSION:
        raise UnknownModelError(f"model version does not exist; use {MODEL_VERSION!r}")
    body = await read_bounded(
        request, state.config.limits.max_request_bytes, setting="--max-request-bytes"
    )
    parsed = parse_infer_request(
        body, parse_header_length(request.headers.get(HEADER_LENGTH)), state.tensor_limits
    )
    inputs = {tensor.name: tensor.array for tensor in parsed.inputs}
    wanted = [output.name for output in parsed.outputs] or None
    # the slot BodyGuard took before the body was read (body_guard.py)
    async with tenant_slot(request, state.quotas, principal.tenant):
        # queued on the model's worker without holding a thread (see server/offload.py)
        results = await state.registry.run_async(
            record, inputs, wanted, encoding=_encoding(parsed), tenant=principal.tenant
        )
    binary = {name for name in results if parsed.wants_binary(name)}

    def respond() -> tuple[bytes, dict[str, str]]:
        parameters = None
        if parsed.receipt:
            parameters = {"receipt": _receipt(state, record, parsed.id, inputs, results)}
        return encode_infer_response(
            record.name, MODEL_VERSION, parsed.id, results, binary, parameters
        )

    # The receipt (digests of the tensors + an ES256 signature, ~0.2 ms for MiniLM's
    # 197 KB of outputs) is made with the encoding, in one step: on the event loop for
    # small tensors, where a thread hop would cost more than the work, else on one thread
    # (docs/performance.md, "receipts on MiniLM").
    extra = 0
    if parsed.receipt:
        extra = tensor_bytes(inputs)
        if not state.has_boot_evidence:  # the first receipt makes a quote: never on the loop
            await state.offload.attestation(state.boot_evidence)
    return await encode_outputs(results, respond, extra_bytes=extra)


infer = BytesEndpoint(_infer)
"""The inference route's ASGI app: the hot path, without Starlette's function wrapper."""


def _encoding(parsed: InferRequest) -> OutputEncoding:
    """The request's choice of binary or JSON per output, for the worker's size check."""
    named = {output.name: output.binary for output in parsed.outputs}
    return OutputEncoding(parsed.binary_output_default, named)


def _receipt(
    state: ServerState,
    record: ModelRecord,
    request_id: str | None,
    inputs: Mapping[str, object],
    outputs: Mapping[str, object],
) -> dict[str, str]:
    return state.receipt(
        "inference",
        record,
        request_id=request_id,
        inputs_digest=tensor_digest(inputs),  # type: ignore[arg-type]
        outputs_digest=tensor_digest(outputs),  # type: ignore[arg-type]
    )


routes = [
    # inference first: the router tries the routes in order, and no two templates of the
    # app overlap (tests/unit/test_server_routes.py), so the order changes nothing else
    Route("/v2/models/{ref}/infer", infer, methods=["POST"]),
    Route("/v2/models/{ref}/versions/{version}/infer", infer, methods=["POST"]),
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", live, methods=["GET"]),
    Route("/v2/health/ready", ready, methods=["GET"]),
    Route("/v2/models/{ref}", model_metadata, methods=["GET"]),
    Route("/v2/models/{ref}/versions/{version}", model_metadata, methods=["GET"]),
    Route("/v2/models/{ref}/ready", model_ready, methods=["GET"]),
    Route("/v2/models/{ref}/versions/{version}/ready", model_ready, methods=["GET"]),
]
