"""The OIP v2 gRPC calls, each the REST route's twin on the same ServerState.

Requests arrive as bytes (no deserializer is registered) and are parsed here, once, after
the size check and the caller's key: a malformed message is INVALID_ARGUMENT like any
other bad request, and a caller without a valid key gets UNAUTHENTICATED before its
message is parsed. What each call does, and under which `Action`, is what the REST route
of the same name does (routes/inference.py, routes/repository.py); models run through
`registry.run_async`, the REST path, in the same isolated workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeAlias

import grpc

import blindinfer
from blindinfer.errors import ProtocolError
from blindinfer.protocol.oip_grpc import oip_v2_pb2 as pb
from blindinfer.protocol.oip_grpc import service
from blindinfer.protocol.oip_grpc.tensors import (
    encode_infer_response,
    parse_infer_request,
    parse_message,
)
from blindinfer.protocol.receipts import tensor_digest
from blindinfer.runtime.response_size import OutputEncoding
from blindinfer.server.auth import Action, ForbiddenError, authorize
from blindinfer.server.bodies import too_large_message
from blindinfer.server.errors import PayloadTooLargeError
from blindinfer.server.grpc import caller
from blindinfer.server.grpc.status import grpc_error
from blindinfer.server.routes.inference import EXTENSIONS, MODEL_VERSION
from blindinfer.server.state import ServerState
from blindinfer.store.errors import UnknownModelError
from blindinfer.store.names import check_name as check_model_name
from blindinfer.store.sealed import ModelRecord

Context: TypeAlias = Any  # grpc.aio.ServicerContext: grpcio ships no type stubs
Handler = Callable[[bytes, Context], Awaitable[bytes]]
Observe = Callable[[str, str, float], None]
"""Records one call: method, status code name, seconds (ServerMetrics.observe_grpc_call)."""

FILE_PREFIX: Final = "file:"
MAX_CONFIG_CHARS: Final = 64 * 1024
LOAD_ENVELOPE_BYTES: Final = 64 * 1024
"""A load message's bytes beyond its model file: names, config, protobuf framing."""
OFF_LOOP_BYTES: Final = 256 * 1024
"""Inference messages from this size on are parsed on a thread: typed `contents` cost
~0.2 us per element (16 MB of fp32_contents: 0.8 s), which would stall every other call
on the listener's loop; raw tensors are views and cost nothing either way."""
PARSE_THREADS: Final = 2


class OipServicer:
    """The handlers of `service.METHODS`, bound to one server's state."""

    def __init__(self, state: ServerState, observe: Observe | None = None) -> None:
        self.state = state
        self.observe = observe
        limits = state.config.limits
        self.max_infer_bytes = limits.max_request_bytes
        # grpc holds a whole message in memory before a handler sees it, so a load is
        # bounded by the request limit too: larger models go through REST's upload, which
        # streams into the sealed store (docs/grpc.md, "Limits")
        self.max_load_bytes = (
            min(limits.max_model_bytes, limits.max_request_bytes) + LOAD_ENVELOPE_BYTES
        )
        self._parsing = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="blindinfer-grpc")

    def close(self) -> None:
        self._parsing.shutdown(wait=False, cancel_futures=True)

    def handlers(self) -> grpc.GenericRpcHandler:
        """The generic handler grpc.aio serves: raw bytes in and out, errors mapped."""
        calls: dict[str, Handler] = {
            service.SERVER_LIVE.name: self.server_live,
            service.SERVER_READY.name: self.server_ready,
            service.MODEL_READY.name: self.model_ready,
            service.SERVER_METADATA.name: self.server_metadata,
            service.MODEL_METADATA.name: self.model_metadata,
            service.MODEL_INFER.name: self.model_infer,
            service.REPOSITORY_MODEL_LOAD.name: self.repository_model_load,
            service.REPOSITORY_MODEL_UNLOAD.name: self.repository_model_unload,
        }
        assert set(calls) == {method.name for method in service.METHODS}
        return grpc.method_handlers_generic_handler(
            service.SERVICE_NAME,
            {
                name: grpc.unary_unary_rpc_method_handler(_answering(name, call, self.observe))
                for name, call in calls.items()
            },
        )

    # ---- health and metadata (REST: GET /v2, /v2/health/*, /v2/models/{ref}[/ready])

    async def server_live(self, data: bytes, context: Context) -> bytes:
        parse_message(pb.ServerLiveRequest, data)
        return _bytes(pb.ServerLiveResponse(live=True))

    async def server_ready(self, data: bytes, context: Context) -> bytes:
        parse_message(pb.ServerReadyRequest, data)
        return _bytes(pb.ServerReadyResponse(ready=True))

    async def server_metadata(self, data: bytes, context: Context) -> bytes:
        parse_message(pb.ServerMetadataRequest, data)
        return _bytes(
            pb.ServerMetadataResponse(
                name="blindinfer", version=blindinfer.__version__, extensions=EXTENSIONS
            )
        )

    async def model_ready(self, data: bytes, context: Context) -> bytes:
        principal = caller.principal(self.state, context.invocation_metadata())
        request = parse_message(pb.ModelReadyRequest, data)
        try:
            _check_version(request.version)
            self.state.model_for(principal, request.name, Action.READ_METADATA)
        except UnknownModelError:
            # Triton's answer (tritonclient's is_model_ready reads it as False); REST's
            # 404: the same for a missing model and one the caller may not see
            return _bytes(pb.ModelReadyResponse(ready=False))
        except ForbiddenError as exc:
            if exc.visible:
                raise
            return _bytes(pb.ModelReadyResponse(ready=False))
        return _bytes(pb.ModelReadyResponse(ready=True))

    async def model_metadata(self, data: bytes, context: Context) -> bytes:
        principal = caller.principal(self.state, context.invocation_metadata())
        request = parse_message(pb.ModelMetadataRequest, data)
        _check_version(request.version)
        record = self.state.model_for(principal, request.name, Action.READ_METADATA)
        signature = await self.state.registry.signature_async(record)
        response = pb.ModelMetadataResponse(
            name=record.name,
            versions=[MODEL_VERSION],
            platform="onnxruntime_genai" if record.kind == "generative" else "onnxruntime_onnx",
        )
        for spec in signature.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in signature.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return _bytes(response)

    # ---- inference (REST: POST /v2/models/{ref}/infer)

    async def model_infer(self, data: bytes, context: Context) -> bytes:
        state = self.state
        principal = caller.principal(state, context.invocation_metadata())
        if len(data) > self.max_infer_bytes:
            raise PayloadTooLargeError(
                too_large_message(
                    "the request", self.max_infer_bytes, "--max-request-bytes", len(data)
                )
            )
        if len(data) < OFF_LOOP_BYTES:
            parsed = parse_infer_request(data, state.tensor_limits)
        else:
            parsed = await asyncio.get_running_loop().run_in_executor(
                self._parsing, parse_infer_request, data, state.tensor_limits
            )
        del data
        record = state.model_for(principal, parsed.model_name, Action.RUN)
        _check_version(parsed.model_version or "")
        request = parsed.request
        inputs = {tensor.name: tensor.array for tensor in request.inputs}
        wanted = [output.name for output in request.outputs] or None
        async with state.quotas.slot(principal.tenant):
            results = await state.registry.run_async(
                record,
                inputs,
                wanted,
                encoding=OutputEncoding(True, {}),  # raw bytes: no JSON blow-up to bound
                tenant=principal.tenant,
            )
        receipt = None
        if request.receipt:
            receipt = await state.offload.attestation(
                lambda: state.receipt(
                    "inference",
                    record,
                    request_id=request.id,
                    inputs_digest=tensor_digest(inputs),
                    outputs_digest=tensor_digest(results),
                )
            )
        return encode_infer_response(record.name, MODEL_VERSION, request.id, results, receipt)

    # ---- repository (REST: POST /v2/repository/models/{name}/load, .../unload)

    async def repository_model_load(self, data: bytes, context: Context) -> bytes:
        """With one `file:<path>` parameter: an upload of that ONNX model under the name,
        through REST's upload path (validated in a worker, sealed, quotas, audit).
        Without one: succeeds for a model the caller may see, as REST's load does."""
        state = self.state
        principal = caller.principal(state, context.invocation_metadata())
        authorize(principal, Action.UPLOAD)
        if len(data) > self.max_load_bytes:
            raise PayloadTooLargeError(
                too_large_message(
                    "a model loaded over gRPC",
                    self.max_load_bytes - LOAD_ENVELOPE_BYTES,
                    "--max-request-bytes; upload larger models over REST",
                )
            )
        request = parse_message(pb.RepositoryModelLoadRequest, data)
        del data
        model = _model_file(request.parameters)
        if model is None:
            state.model_for(principal, request.model_name, Action.READ_METADATA)
            return _bytes(pb.RepositoryModelLoadResponse())
        limit = state.config.limits.max_model_bytes
        if len(model) > limit:
            raise PayloadTooLargeError(
                too_large_message("the model", limit, "--max-model-bytes", len(model))
            )
        name = check_model_name(request.model_name)
        admit = state.quotas.admission(principal.tenant)  # decided and reserved atomically

        def store() -> tuple[ModelRecord, bool]:
            sha256 = hashlib.sha256(model).hexdigest()
            return state.registry.add(model, sha256, name=name, owner=principal.tenant, admit=admit)

        await state.offload.upload(store)
        return _bytes(pb.RepositoryModelLoadResponse())

    async def repository_model_unload(self, data: bytes, context: Context) -> bytes:
        """REST's unload: the model and its sealed copy are deleted (routes/repository.py)."""
        state = self.state
        principal = caller.principal(state, context.invocation_metadata())
        request = parse_message(pb.RepositoryModelUnloadRequest, data)
        record = state.model_for(principal, request.model_name, Action.DELETE)
        await state.offload.store(state.registry.delete, record)
        return _bytes(pb.RepositoryModelUnloadResponse())


def _bytes(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _check_version(version: str) -> None:
    if version and version != MODEL_VERSION:
        raise UnknownModelError(
            f"model version {version[:20]!r} does not exist; use {MODEL_VERSION!r}"
        )


def _model_file(parameters: Any) -> bytes | None:
    """The one model file among the load parameters (None if there is none). "config"
    (tritonclient's model configuration) is accepted and unused: an ONNX model's
    signature comes from the model itself."""
    files = [key for key in parameters if key.startswith(FILE_PREFIX)]
    if "config" in parameters:
        config = parameters["config"]
        if config.WhichOneof("parameter_choice") != "string_param" or (
            len(config.string_param) > MAX_CONFIG_CHARS
        ):
            raise ProtocolError("invalid_parameter", "config must be a string_param of JSON")
    if not files:
        return None
    if len(files) > 1:
        raise ProtocolError(
            "invalid_parameter", "give one model file: an ONNX model is a single file"
        )
    value = parameters[files[0]]
    if value.WhichOneof("parameter_choice") != "bytes_param":
        raise ProtocolError("invalid_parameter", "a file: parameter must be a bytes_param")
    model: bytes = value.bytes_param
    return model


def _answering(method: str, call: Handler, observe: Observe | None) -> Handler:
    """`call` with every exception answered as a gRPC status (status.py), never raised
    to grpc, which would log it and answer UNKNOWN with the exception's text; each call
    recorded by `observe` (the /metrics families), its status included."""

    async def answer(data: bytes, context: Context) -> bytes:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await call(data, context)
        except Exception as exc:
            error = grpc_error(exc, method)
            code = error.status
            context.set_trailing_metadata(error.trailing_metadata)
            await context.abort(error.status, error.details)
            raise AssertionError("abort returned") from None  # pragma: no cover
        except BaseException:  # the caller went away (cancelled) or the server stops
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if observe is not None:
                observe(method, code.name, time.perf_counter() - started)

    return answer
