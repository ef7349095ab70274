"""Model management, after Triton's model repository extension.

- `POST /v2/repository/index`: the models visible to the caller, with their state.
- `PUT|POST /v2/repository/models/{name}/upload`: the raw ONNX bytes as a streamed body
  (bounded by `max_model_bytes`); answers model_id and SHA-256. With Content-Type
  `application/x-tar` the body is a generative model folder as `model_archive`'s archive,
  checked entry by entry while it streams (a bad entry is refused before the rest is read)
  and stored as one blob of kind "generative". `{name}` may be `_` to let
  the server name the model after its model_id. Optional query `share=tenant,tenant|*`.
- `POST /v2/repository/models/{name}/load`: Triton's form, the model inline in
  `parameters["file:1/model.onnx"]` (base64), bounded by `max_request_bytes`; without a
  file it succeeds only for a model that is already there.
- `DELETE /v2/repository/models/{ref}` and `POST .../unload`: remove the model and its
  sealed copy (only its owner's keys or an admin).
- `?receipt=1` on upload, load and delete: the reply carries "receipt", a JWS signed with the
  attested TLS key (see docs/receipts.md).
- `POST /v2/repository/models/{ref}/share` with `{"tenants": [...]}` ("*" = everyone).

Names are per tenant: two tenants may both have a model called "classifier".
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
from blindinfer.protocol.content_types import TAR, media_type
from blindinfer.protocol.genai_config import parse_genai_config
from blindinfer.protocol.model_archive import ArchiveLimits, ArchiveParser, ModelArchive
from blindinfer.server.auth import (
    EVERY_TENANT,
    Action,
    AuthConfigError,
    Principal,
    authorize,
    check_tenant_name,
    sharing_view,
    visible_to,
)
from blindinfer.server.bodies import (
    check_declared_length,
    read_bounded,
    read_bounded_hashed,
    too_large_message,
)
from blindinfer.server.body_guard import stored_bytes_room
from blindinfer.server.errors import PayloadTooLargeError
from blindinfer.server.respond import json_response as _json
from blindinfer.server.respond import server_state as _state
from blindinfer.server.state import ServerState
from blindinfer.store.names import ANONYMOUS_NAME
from blindinfer.store.names import check_name as check_model_name
from blindinfer.store.sealed import ModelRecord

ANONYMOUS = ANONYMOUS_NAME
TRITON_FILE_PARAMETER = "file:1/model.onnx"
MAX_SHARED_TENANTS = 64
DELETE_STATEMENT = ["model", "sealed_copies"]
"""What a delete receipt states was destroyed: the model and every sealed copy of it."""
MAX_MODEL_BYTES_SETTING = "--max-model-bytes"
MAX_REQUEST_BYTES_SETTING = "--max-request-bytes"


def describe(model: ModelRecord, viewer: Principal) -> dict[str, object]:
    """A model as `viewer` may see it: a tenant it is shared with sees neither the owner
    nor the other tenants on its share list (`sharing_view`)."""
    owner, shared_with = sharing_view(viewer, model.owner, model.shared_with)
    described: dict[str, object] = {
        "name": model.name,
        "model_id": model.model_id,
        "sha256": model.sha256,
        "size": model.size,
        "kind": model.kind,
    }
    if owner is not None:
        described["owner"] = owner
    return {
        **described,
        "shared_with": shared_with,
        "version": "1",
        "state": "READY",
        "reason": "",
    }


def _tenants(value: object) -> list[str]:
    if isinstance(value, str):
        value = [t for t in value.split(",") if t]
    if not isinstance(value, list) or len(value) > MAX_SHARED_TENANTS:
        raise ProtocolError("invalid_parameter", "tenants must be a list of tenant names")
    for tenant in value:
        if tenant != EVERY_TENANT:
            try:
                check_tenant_name("tenants", tenant)
            except AuthConfigError as exc:
                raise ProtocolError("invalid_parameter", str(exc)[:200]) from exc
    return list(value)


def _requested_name(request: Request) -> str | None:
    requested: str = request.path_params["name"]
    return None if requested == ANONYMOUS else requested


def _check_room(state: ServerState, principal: Principal, name: str | None, size: int) -> None:
    """The tenant's quota and the server's model count for one more model of `size`
    bytes: what can be refused before the body arrives is refused then (and checked again
    once it is there: other uploads may have landed meanwhile)."""
    state.registry.check_room(
        name, principal.tenant, size, state.quotas.admission(principal.tenant)
    )


async def _store(
    request: Request,
    principal: Principal,
    data: bytes,
    sha256: str,
    *,
    shared: list[str],
    wants_receipt: bool,
    kind: str = "tensor",
) -> Response:
    state = _state(request)
    name = _requested_name(request)
    if name is not None:
        check_model_name(name)
    admit = state.quotas.admission(principal.tenant)  # decided and reserved atomically
    record, created = await state.offload.upload(
        lambda: state.registry.add(
            data,
            sha256,
            name=name,
            owner=principal.tenant,
            shared_with=shared,
            admit=admit,
            kind=kind,
        )
    )
    reply: dict[str, object] = {**describe(record, principal), "created": created}
    if wants_receipt:
        reply["receipt"] = await run_in_threadpool(state.receipt, "upload", record)
    return _json(reply, 201 if created else 200)


def _wants_receipt(request: Request) -> bool:
    value = request.query_params.get("receipt", "0")
    if value not in ("0", "1", "true", "false"):
        raise ProtocolError("invalid_parameter", "receipt must be 1 or 0")
    return value in ("1", "true")


def _uploader(request: Request) -> Principal:
    state = _state(request)
    principal = state.principal(request)
    authorize(principal, Action.UPLOAD)
    return principal


async def upload(request: Request) -> Response:
    """Everything that can be refused is refused before the body is read: the key and its
    role, the name, the query, the declared size, the quotas; then the body streams in."""
    state = _state(request)
    principal = _uploader(request)
    name = _requested_name(request)
    if name is not None:
        check_model_name(name)
    shared = _tenants(request.query_params.get("share", ""))
    wants_receipt = _wants_receipt(request)
    limit = state.config.limits.max_model_bytes
    declared = check_declared_length(
        request, limit, what="the model", setting=MAX_MODEL_BYTES_SETTING
    )
    _check_room(state, principal, name, declared or 0)
    # without Content-Length the quota is enforced while the body streams
    room = None
    if declared is None:
        room = stored_bytes_room(state.quotas, state.registry, principal.tenant, name)
    archive = _archive_parser(request, limit)
    data, sha256 = await read_bounded_hashed(
        request,
        limit,
        setting=MAX_MODEL_BYTES_SETTING,
        room=room,
        observe=None if archive is None else archive.feed,
    )
    kind = "tensor"
    if archive is not None:
        _check_generative(archive.finish())
        kind = "generative"
    return await _store(
        request, principal, data, sha256, shared=shared, wants_receipt=wants_receipt, kind=kind
    )


def _archive_parser(request: Request, limit: int) -> ArchiveParser | None:
    """A streaming parser for a generative model's archive (Content-Type
    application/x-tar), bounded by the same model size limit; None for an ONNX file."""
    if media_type(request.headers.get("content-type", "")) != TAR:
        return None
    return ArchiveParser(ArchiveLimits(max_total_bytes=limit))


def _check_generative(archive: ModelArchive) -> None:
    """genai_config.json parsed and bounded here, before a worker sees the model."""
    parse_genai_config(archive.genai_config, entries=archive.names)


async def load(request: Request) -> Response:
    state = _state(request)
    principal = _uploader(request)
    shared = _tenants(request.query_params.get("share", ""))
    wants_receipt = _wants_receipt(request)
    body = await read_bounded(
        request, state.config.limits.max_request_bytes, setting=MAX_REQUEST_BYTES_SETTING
    )
    try:
        document = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("malformed_json", "the load request is not valid JSON") from exc
    parameters = document.get("parameters", {}) if isinstance(document, dict) else None
    if not isinstance(parameters, dict):
        raise ProtocolError("malformed_json", "parameters must be a JSON object")
    encoded = parameters.get(TRITON_FILE_PARAMETER)
    if encoded is None:
        record = state.model_for(principal, request.path_params["name"], Action.READ_METADATA)
        return _json({**describe(record, principal), "created": False})
    if not isinstance(encoded, str):
        raise ProtocolError("invalid_parameter", f"{TRITON_FILE_PARAMETER} must be base64 text")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("invalid_parameter", f"{TRITON_FILE_PARAMETER} is not base64") from exc
    limit = state.config.limits.max_model_bytes
    if len(data) > limit:
        raise PayloadTooLargeError(
            too_large_message("the model", limit, MAX_MODEL_BYTES_SETTING, len(data))
        )
    reply = await _store(
        request,
        principal,
        data,
        hashlib.sha256(data).hexdigest(),
        shared=shared,
        wants_receipt=wants_receipt,
    )
    reply.status_code = 200  # Triton answers 200 to a load; tritonclient treats 201 as failure
    return reply


async def delete(request: Request) -> Response:
    state = _state(request)
    principal = state.principal(request)
    record = state.model_for(principal, request.path_params["ref"], Action.DELETE)
    wants_receipt = _wants_receipt(request)
    await state.offload.store(state.registry.delete, record)
    reply: dict[str, object] = {
        **describe(record, principal),
        "state": "DELETED",
        "sealed_copy_destroyed": True,
    }
    if wants_receipt:
        reply["receipt"] = await run_in_threadpool(
            lambda: state.receipt("delete", record, destroyed=DELETE_STATEMENT)
        )
    return _json(reply)


async def share(request: Request) -> Response:
    state = _state(request)
    principal = state.principal(request)
    record = state.model_for(principal, request.path_params["ref"], Action.SHARE)
    body = await read_bounded(request, 16 * 1024)
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("malformed_json", "the share request is not valid JSON") from exc
    tenants = _tenants(document.get("tenants") if isinstance(document, dict) else None)
    shared = await state.offload.store(state.registry.share, record, tenants)
    return _json(describe(shared, principal))


async def index(request: Request) -> Response:
    state = _state(request)
    principal = state.principal(request)
    authorize(principal, Action.LIST)
    records = state.registry.records(lambda r: visible_to(principal, r.owner, r.shared_with))
    return _json([describe(record, principal) for record in records])


routes = [
    Route("/v2/repository/index", index, methods=["POST", "GET"]),
    Route("/v2/repository/models/{name}/upload", upload, methods=["PUT", "POST"]),
    Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
    Route("/v2/repository/models/{ref}", delete, methods=["DELETE"]),
    Route("/v2/repository/models/{ref}/unload", delete, methods=["POST"]),
    Route("/v2/repository/models/{ref}/share", share, methods=["POST"]),
]
