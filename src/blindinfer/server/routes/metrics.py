"""GET /metrics: request counts and latencies (recorded by
`blindinfer.server.metrics.MetricsMiddleware` in the server's own prometheus_client
registry), plus families read at scrape time from the registry and the worker pool, in the
format the scraper asks for (prometheus_client's negotiation). Admin keys only when
authentication is configured; open in open mode (where every caller is an administrator
anyway).

Counts, bytes and worker indexes only: never model names (unless the operator enabled
them, see `ServerMetrics`), hashes, ids or tensor content.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from blindinfer.server.auth import Action, authorize
from blindinfer.server.metrics import ServerMetrics
from blindinfer.server.respond import server_state


def resident_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process (Linux /proc), None where unavailable."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as file:
            fields = file.read().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _int(worker: Mapping[str, object], key: str) -> int:
    value = worker.get(key)
    return int(value) if isinstance(value, int | bool) else 0


def _scrape_time_families(
    registry_stats: Mapping[str, int], workers: list[dict[str, object]], open_mode: bool
) -> list[Metric]:
    families: list[Metric] = [
        GaugeMetricFamily(f"blindinfer_{name}", help_text, value=float(registry_stats[key]))
        for name, key, help_text in (
            ("models", "models", "Models in the registry."),
            ("models_loaded", "loaded", "Models with a session in memory now."),
            ("memory_budget_bytes", "memory_budget", "Memory budget for loaded models."),
            ("memory_used_bytes", "memory_used", "Measured memory of loaded models."),
            ("stored_bytes", "stored_bytes", "Bytes of sealed model storage in use."),
        )
    ]
    worker = ["worker"]
    up = GaugeMetricFamily(
        "blindinfer_worker_up", "1 if the inference worker process is alive.", labels=worker
    )
    restarts = CounterMetricFamily(
        "blindinfer_worker_restarts_total",
        "Times the inference worker process was restarted.",
        labels=worker,
    )
    pending = GaugeMetricFamily(
        "blindinfer_worker_pending_requests",
        "Requests being served by or waiting for the worker.",
        labels=worker,
    )
    memory = GaugeMetricFamily(
        "blindinfer_worker_model_memory_bytes",
        "Measured session memory of the models placed on the worker.",
        labels=worker,
    )
    resident = GaugeMetricFamily(
        "blindinfer_worker_resident_memory_bytes",
        "Resident set size of the worker process.",
        labels=worker,
    )
    for w in workers:
        index = [str(_int(w, "index"))]
        up.add_metric(index, float(bool(w.get("alive"))))
        restarts.add_metric(index, float(_int(w, "restarts")))
        pending.add_metric(index, float(_int(w, "pending")))
        memory.add_metric(index, float(_int(w, "memory_bytes")))
        pid = w.get("pid")
        rss = resident_bytes(pid) if isinstance(pid, int) and w.get("alive") else None
        if rss is not None:
            resident.add_metric(index, float(rss))
    open_gauge = GaugeMetricFamily(
        "blindinfer_open_mode",
        "1 if the server runs without API keys (every caller is an administrator).",
        value=float(open_mode),
    )
    return [*families, up, restarts, pending, memory, resident, open_gauge]


async def metrics(request: Request) -> Response:
    state = server_state(request)
    authorize(state.principal(request), Action.ADMIN)
    stats = state.registry.stats()
    workers = await run_in_threadpool(state.registry.pool_stats)
    families = _scrape_time_families(
        {
            "models": stats.models,
            "loaded": stats.loaded,
            "memory_budget": stats.memory_budget,
            "memory_used": stats.memory_used,
            "stored_bytes": stats.stored_bytes,
        },
        workers,
        state.authenticator.open_mode,
    )
    families += state.quotas.generations.metric_families()  # generations, KV, tokens
    recorded: ServerMetrics = request.app.state.metrics
    recorded.forget_models((r.owner, r.name) for r in state.registry.records())
    body, content_type = recorded.exposition(request.headers.get("accept"), families)
    return Response(body, headers={"Content-Type": content_type})


routes = [Route("/metrics", metrics, methods=["GET"])]
