"""Operator view (admin keys only): memory budget, storage and workers. No model names,
no tensor content: counts, bytes and process ids only."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from blindinfer.server.auth import Action, authorize
from blindinfer.server.respond import json_response, server_state


async def stats(request: Request) -> Response:
    state = server_state(request)
    authorize(state.principal(request), Action.ADMIN)
    registry = state.registry.stats()
    workers = await run_in_threadpool(state.registry.pool_stats)
    return json_response(
        {
            "models": registry.models,
            "loaded": registry.loaded,
            "memory_budget_bytes": registry.memory_budget,
            "memory_used_bytes": registry.memory_used,
            # per tenant, as charged against its memory quota ("" = charged to nobody)
            "memory_used_bytes_by_tenant": state.registry.loaded_by_tenant(),
            # generative models: generations running in their workers, their KV reservations
            "generations_running_by_tenant": state.quotas.generations.running_by_tenant(),
            "kv_cache_reserved_bytes_by_tenant": (state.quotas.generations.kv_reserved_by_tenant()),
            "stored_bytes": registry.stored_bytes,
            "workers": [
                {k: w[k] for k in ("index", "pid", "alive", "loaded", "memory_bytes", "restarts")}
                for w in workers
            ],
            "open_mode": state.authenticator.open_mode,
        }
    )


routes = [Route("/v2/admin/stats", stats, methods=["GET"])]
