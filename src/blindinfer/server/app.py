"""Assembles the ASGI application: state, routes, lifespan and the error mapping."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from blindinfer.errors import BlindInferError
from blindinfer.protocol.limits import TensorLimits
from blindinfer.runtime.workers import WorkerPool
from blindinfer.server import metrics as server_metrics
from blindinfer.server.audit import (
    AuditLog,
    AuditLogError,
    AuditLogInUseError,
    audit_file_name,
)
from blindinfer.server.auth import AuthConfig, Authenticator
from blindinfer.server.bodies import CloseUnreadBodies
from blindinfer.server.body_guard import BodyBudget, BodyGuard
from blindinfer.server.config import ServerConfig
from blindinfer.server.content_types import CheckContentType
from blindinfer.server.errors import AnswerUnexpectedErrors, handle_exception
from blindinfer.server.generation_quota import GenerationDefaults
from blindinfer.server.quotas import TenantQuotas
from blindinfer.server.routes import (
    admin,
    attestation,
    inference,
    metrics,
    oip_generate,
    openai,
    repository,
)
from blindinfer.server.state import FailureThrottle, ServerState
from blindinfer.server.tls import TlsIdentity
from blindinfer.store.key_release import fetch_store_key
from blindinfer.store.keys import simulation_sealing_key
from blindinfer.store.registry import ModelRegistry
from blindinfer.store.sealed import SealedStore
from blindinfer.tee.platform import Platform

log = logging.getLogger("blindinfer.server")
MAX_JSON_REQUEST_BYTES = 8 << 20


class PersistenceUnavailableError(BlindInferError):
    """Persistence was asked for on a platform that cannot seal."""


def _sealing(config: ServerConfig, platform: Platform) -> tuple[Path, bytes]:
    """Where models are sealed, under which key.

    With --store-dir, the platform's sealing key (only the same TEE identity derives it),
    so models survive restarts; with --store-key-resource too, a key the KBS releases to
    attested replicas (store/key_release.py), so replicas share the store. Without it, a
    private temporary directory and a random key that lives in memory only: models are
    offloaded under the memory budget, and gone when the process ends.
    """
    if config.store_dir is None:
        return Path(tempfile.mkdtemp(prefix="blindinfer-store-")), secrets.token_bytes(32)
    directory = Path(config.store_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if config.store_key_resource is not None:  # in every mode, simulation included
        return directory, fetch_store_key(config.store_key_resource, config.cdh_url)
    if platform.kind == "simulation":  # a key file next to the store, loudly insecure
        return directory, simulation_sealing_key(directory)
    try:
        return directory, platform.sealing_key()
    except BlindInferError as exc:
        raise PersistenceUnavailableError(
            f"--store-dir needs a sealing key, and this platform has none: {exc}. Run "
            "without --store-dir (models then live in a private store that ends with the "
            "process)"
        ) from exc


def _audit_log(config: ServerConfig, directory: Path) -> AuditLog:
    """The audit log beside a --store-dir: audit.log for a server alone on it, one file per
    --replica-id where replicas share it (a chain has one writer). In memory without a store."""
    if config.store_dir is None:
        return AuditLog(None)
    try:
        return AuditLog(directory / audit_file_name(config.replica_id))
    except AuditLogInUseError as exc:
        fix = (
            "two replicas were given the same --replica-id; give each its own"
            if config.replica_id is not None
            else "another server uses this --store-dir; give each replica sharing it its "
            "own --replica-id"
        )
        raise AuditLogInUseError(f"{exc}: {fix}") from None


def _authenticator(config: ServerConfig) -> Authenticator:
    auth = (
        AuthConfig.from_file(config.auth_file)
        if config.auth_file
        else AuthConfig.from_env(os.environ)
    )
    if auth is None:
        log.warning(
            "OPEN MODE: no API keys are configured (--auth-file or BLINDINFER_API_KEYS); "
            "every caller is an administrator. Use this for local work only."
        )
    return Authenticator(auth)


def build_state(config: ServerConfig, platform: Platform, identity: TlsIdentity) -> ServerState:
    limits = config.limits
    directory, key = _sealing(config, platform)
    sealed = SealedStore(directory, key, max_bytes=limits.max_stored_bytes)
    audit = _audit_log(config, directory)
    registry_box: list[ModelRegistry] = []
    pool = WorkerPool(
        workers=limits.workers,
        memory_limit_bytes=limits.worker_memory_bytes,
        timeout_s=limits.inference_timeout_ms / 1000,
        load_timeout_s=limits.load_timeout_ms / 1000,
        queue_limit=limits.queue_limit,
        intra_op_threads=config.intra_op_threads,
        spin_us=config.intra_op_spin_us,
        device=config.device,
        source=lambda sha256: registry_box[0].source(sha256),
        max_response_bytes=limits.max_response_bytes,
        max_new_tokens=limits.max_new_tokens,
        max_batch=limits.max_batch,
        max_tensor_batch=config.max_tensor_batch,
    )
    authenticator = _authenticator(config)
    quotas = TenantQuotas(
        authenticator.config,
        memory_budget=limits.memory_budget_bytes,
        generation=GenerationDefaults.from_limits(limits),
    )
    registry = ModelRegistry(
        sealed=sealed,
        pool=pool,
        memory_budget=limits.memory_budget_bytes,
        max_models=limits.max_models,
        audit=audit.record,
        tenant_memory=quotas.memory_limit,
    )
    registry_box.append(registry)
    audit.record("server_start", detail={"models": len(registry.records())})
    return ServerState(
        config=config,
        platform=platform,
        identity=identity,
        registry=registry,
        tensor_limits=TensorLimits(
            max_total_bytes=limits.max_request_bytes,
            # JSON costs ~40 bytes of Python objects per number: bound it well below the
            # binary limit, larger tensors go as binary data.
            max_header_bytes=min(limits.max_request_bytes, MAX_JSON_REQUEST_BYTES),
        ),
        authenticator=authenticator,
        quotas=quotas,
        audit=audit,
        auth_failures=FailureThrottle(),
    )


def close_state(state: ServerState) -> None:
    state.stop_listeners()
    state.registry.close()
    state.offload.close()
    try:
        state.audit.record("server_stop")
    except AuditLogError as exc:  # a full disk must not turn a shutdown into a traceback
        log.error("the audit log could not record server_stop: %s", exc)
    state.audit.close()  # logs the head hash, to anchor the chain elsewhere
    if state.config.store_dir is None:
        shutil.rmtree(state.registry.directory, ignore_errors=True)


def create_app(state: ServerState) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # on a thread: a listener still finishing a call may need this loop meanwhile
        await asyncio.to_thread(state.stop_listeners)
        close_state(state)

    app = Starlette(
        routes=[
            *inference.routes,  # first: the hot route is matched first (routes/inference.py)
            *attestation.routes,
            *oip_generate.routes,
            *repository.routes,
            *admin.routes,
            *metrics.routes,
            *openai.routes,
        ],
        exception_handlers={
            BlindInferError: handle_exception,
            HTTPException: handle_exception,
            # a client gone mid-body is an ordinary accident: answered (to nobody) and
            # counted, never re-raised to uvicorn as a server error with a traceback
            ClientDisconnect: handle_exception,
            Exception: handle_exception,
        },
        lifespan=lifespan,
    )
    app.state.blindinfer = state
    # innermost: answers what escapes the routes, so that nothing reaches uvicorn
    app.add_middleware(AnswerUnexpectedErrors, handler=handle_exception)
    app.add_middleware(CheckContentType)  # inside CloseUnreadBodies: a 415 reads no body
    # bodies: the tenant's slot, the server-wide budget and the deadlines (body_guard.py)
    app.state.body_budget = BodyBudget.from_limits(state.config.connections)
    app.add_middleware(
        BodyGuard,
        limits=state.config.connections,
        budget=app.state.body_budget,
        quotas=state.quotas,
        authenticator=state.authenticator,
    )
    app.add_middleware(CloseUnreadBodies)
    server_metrics.install(app, model_names=state.config.metrics_model_names)
    # outermost too: what a middleware itself raises is answered, not re-raised to uvicorn
    app.add_middleware(AnswerUnexpectedErrors, handler=handle_exception)
    return app
