"""Assembles the ASGI application from its routes, state and the error mapping."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from blindinfer.errors import BlindInferError
from blindinfer.protocol.limits import TensorLimits
from blindinfer.server.config import ServerConfig
from blindinfer.server.errors import handle_exception
from blindinfer.server.routes import attestation, inference, repository
from blindinfer.server.state import ServerState
from blindinfer.server.tls import TlsIdentity
from blindinfer.store.memory import ModelStore
from blindinfer.tee.platform import Platform

MAX_JSON_REQUEST_BYTES = 8 << 20


def build_state(config: ServerConfig, platform: Platform, identity: TlsIdentity) -> ServerState:
    return ServerState(
        config=config,
        platform=platform,
        identity=identity,
        store=ModelStore(max_models=config.limits.max_models),
        tensor_limits=TensorLimits(
            max_total_bytes=config.limits.max_request_bytes,
            # JSON costs ~40 bytes of Python objects per number: bound it well below the
            # binary limit, larger tensors go as binary data.
            max_header_bytes=min(config.limits.max_request_bytes, MAX_JSON_REQUEST_BYTES),
        ),
    )


def create_app(state: ServerState) -> Starlette:
    app = Starlette(
        routes=[*attestation.routes, *inference.routes, *repository.routes],
        exception_handlers={
            BlindInferError: handle_exception,
            HTTPException: handle_exception,
            Exception: handle_exception,
        },
    )
    app.state.blindinfer = state
    return app
