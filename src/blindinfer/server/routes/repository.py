"""Model management, after Triton's model repository extension.

- `POST /v2/repository/index`: every model with its state.
- `PUT|POST /v2/repository/models/{name}/upload`: the raw ONNX bytes as a streamed body
  (bounded by `max_model_bytes`); answers model_id and SHA-256. `{name}` may be `_` to let
  the server name the model after its model_id.
- `POST /v2/repository/models/{name}/load`: Triton's form, the model inline in
  `parameters["file:1/model.onnx"]` (base64), bounded by `max_request_bytes`; without a
  file it succeeds only for a model that is already there.
- `DELETE /v2/repository/models/{ref}` and `POST .../unload`: remove the model. The
  repository is memory-only, so unloading and deleting are the same act.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from blindinfer.errors import ProtocolError
from blindinfer.server.bodies import read_bounded, read_bounded_hashed
from blindinfer.server.errors import PayloadTooLargeError
from blindinfer.server.respond import json_response as _json
from blindinfer.server.respond import server_state as _state
from blindinfer.store.memory import StoredModel

ANONYMOUS = "_"
TRITON_FILE_PARAMETER = "file:1/model.onnx"


def describe(model: StoredModel) -> dict[str, object]:
    return {
        "name": model.name,
        "model_id": model.model_id,
        "sha256": model.sha256,
        "size": model.size,
        "version": "1",
        "state": "READY",
        "reason": "",
    }


async def _store(request: Request, data: bytes, sha256: str) -> Response:
    state = _state(request)
    requested = request.path_params["name"]
    name = None if requested == ANONYMOUS else requested
    model, created = await run_in_threadpool(state.store.add, data, sha256, name)
    return _json({**describe(model), "created": created}, 201 if created else 200)


async def upload(request: Request) -> Response:
    data, sha256 = await read_bounded_hashed(request, _state(request).config.limits.max_model_bytes)
    return await _store(request, data, sha256)


async def load(request: Request) -> Response:
    state = _state(request)
    body = await read_bounded(request, state.config.limits.max_request_bytes)
    try:
        document = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("malformed_json", "the load request is not valid JSON") from exc
    parameters = document.get("parameters", {}) if isinstance(document, dict) else None
    if not isinstance(parameters, dict):
        raise ProtocolError("malformed_json", "parameters must be a JSON object")
    encoded = parameters.get(TRITON_FILE_PARAMETER)
    if encoded is None:
        model = state.store.resolve(request.path_params["name"])
        return _json({**describe(model), "created": False})
    if not isinstance(encoded, str):
        raise ProtocolError("invalid_parameter", f"{TRITON_FILE_PARAMETER} must be base64 text")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("invalid_parameter", f"{TRITON_FILE_PARAMETER} is not base64") from exc
    if len(data) > state.config.limits.max_model_bytes:
        raise PayloadTooLargeError("the model is larger than the model size limit")
    return await _store(request, data, hashlib.sha256(data).hexdigest())


async def delete(request: Request) -> Response:
    model = _state(request).store.delete(request.path_params["ref"])
    return _json({**describe(model), "state": "DELETED"})


async def index(request: Request) -> Response:
    return _json([describe(model) for model in _state(request).store.models()])


routes = [
    Route("/v2/repository/index", index, methods=["POST", "GET"]),
    Route("/v2/repository/models/{name}/upload", upload, methods=["PUT", "POST"]),
    Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
    Route("/v2/repository/models/{ref}", delete, methods=["DELETE"]),
    Route("/v2/repository/models/{ref}/unload", delete, methods=["POST"]),
]
