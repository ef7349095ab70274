"""GET /metrics in the Prometheus text format: request counts and latencies (recorded by
`blindinfer.server.metrics.MetricsMiddleware`), plus gauges read at scrape time from the
registry and the worker pool. Admin keys only when authentication is configured; open in
open mode (where every caller is an administrator anyway).

Counts, bytes and worker indexes only: never model names (unless the operator enabled
them, see `ServerMetrics`), hashes, ids or tensor content.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from blindinfer.server.auth import Action, authorize
from blindinfer.server.metrics import CONTENT_TYPE, Sample, ServerMetrics, render_family
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
) -> str:
    parts = [
        render_family(f"blindinfer_{name}", "gauge", help_text, [({}, float(registry_stats[key]))])
        for name, key, help_text in (
            ("models", "models", "Models in the registry."),
            ("models_loaded", "loaded", "Models with a session in memory now."),
            ("memory_budget_bytes", "memory_budget", "Memory budget for loaded models."),
            ("memory_used_bytes", "memory_used", "Measured memory of loaded models."),
            ("stored_bytes", "stored_bytes", "Bytes of sealed model storage in use."),
        )
    ]
    index = [{"worker": str(_int(w, "index"))} for w in workers]
    worker_rss: list[Sample] = []
    for labels, worker in zip(index, workers, strict=True):
        pid = worker.get("pid")
        rss = resident_bytes(pid) if isinstance(pid, int) and worker.get("alive") else None
        if rss is not None:
            worker_rss.append((labels, float(rss)))
    parts += [
        render_family(
            "blindinfer_worker_up",
            "gauge",
            "1 if the inference worker process is alive.",
            [
                (labels, float(bool(w.get("alive"))))
                for labels, w in zip(index, workers, strict=True)
            ],
        ),
        render_family(
            "blindinfer_worker_restarts_total",
            "counter",
            "Times the inference worker process was restarted.",
            [
                (labels, float(_int(w, "restarts")))
                for labels, w in zip(index, workers, strict=True)
            ],
        ),
        render_family(
            "blindinfer_worker_pending_requests",
            "gauge",
            "Requests being served by or waiting for the worker.",
            [(labels, float(_int(w, "pending"))) for labels, w in zip(index, workers, strict=True)],
        ),
        render_family(
            "blindinfer_worker_model_memory_bytes",
            "gauge",
            "Measured session memory of the models placed on the worker.",
            [
                (labels, float(_int(w, "memory_bytes")))
                for labels, w in zip(index, workers, strict=True)
            ],
        ),
        render_family(
            "blindinfer_worker_resident_memory_bytes",
            "gauge",
            "Resident set size of the worker process.",
            worker_rss,
        ),
        render_family(
            "blindinfer_open_mode",
            "gauge",
            "1 if the server runs without API keys (every caller is an administrator).",
            [({}, float(open_mode))],
        ),
    ]
    own = resident_bytes()
    if own is not None:
        parts.append(
            render_family(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size of the server process in bytes.",
                [({}, float(own))],
            )
        )
    return "".join(parts)


async def metrics(request: Request) -> Response:
    state = server_state(request)
    authorize(state.principal(request), Action.ADMIN)
    stats = state.registry.stats()
    workers = await run_in_threadpool(state.registry.pool_stats)
    recorded: ServerMetrics | None = getattr(request.app.state, "metrics", None)
    if recorded is not None:
        recorded.forget_models((r.owner, r.name) for r in state.registry.records())
    text = (recorded.render() if recorded is not None else "") + _scrape_time_families(
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
    text += state.quotas.generations.metrics()  # generations running, KV reserved, tokens
    return Response(text, headers={"Content-Type": CONTENT_TYPE})


routes = [Route("/metrics", metrics, methods=["GET"])]
