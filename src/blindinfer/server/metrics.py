"""Prometheus metrics: the ASGI middleware that records requests, into prometheus_client
metrics held in a registry of this server's own.

The metric types and the exposition are prometheus_client's (the library operators and
reviewers know), with one `CollectorRegistry` per server: nothing is registered in the
library's global ``REGISTRY``, so two servers in one process count apart and an embedding
application's own metrics never mix with ours (tests/unit/test_metrics.py checks both).
The format is negotiated as the library's own ASGI app does (`choose_encoder`): the text
format 0.0.4 by default, OpenMetrics when the scraper asks for it (Prometheus does).
Counters and histograms also expose the library's ``_created`` series (creation times).

Cost on the hot path, per request (in-flight gauge up and down, counter, histogram), old
hand-written registry against this one, interleaved (bench/bench_metrics.py, 2 shared vCPU,
2026-12-07): 1.98 against 2.19 us median (3.4 against 3.3 us in a busier run); 4.3 us
before `observe_request` kept each label set's children (``labels()`` is half the cost).
A scrape of 60 label sets: 0.7 against 3.3 ms (now with the process collector's /proc
reads and the ``_created`` series), once per scrape interval.

What is recorded, and what never is:

- requests by *route template* (``/v2/models/{ref}/infer``), method and status, and their
  latency in a histogram with fixed buckets. Never the raw path: paths carry model names,
  hashes and ids. Requests that match no route count as ``route="unmatched"``; methods
  outside the standard set count as ``method="other"``, so a caller cannot grow the label
  space.
- with the operator's consent only (``model_names=True``): successful inferences per model,
  labelled by the owning tenant and the model's *registered* name, resolved exactly as the
  route resolves it. A reference that does not resolve is never recorded, so unknown names
  sent by callers never reach the output; the series of a model that no longer exists
  (deleted, by whatever path) is forgotten at the next scrape (`forget_models`).
- clients that went away before their request body was complete, by route template and
  method (``blindinfer_client_disconnects_total``); in the request counter they have
  ``status="499"`` (nginx's "client closed request"): never a 5xx, which means the server
  failed.
- never tensor content, request ids, headers or bodies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blindinfer.errors import BlindInferError, UsageError

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
UNMATCHED = "unmatched"
OTHER_METHOD = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Seconds; from sub-millisecond health checks to the default 60 s inference timeout.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
CLIENT_CLOSED_REQUEST = 499
"""The status recorded for a request whose client disconnected before its body was
complete; the error handler answers it (to nobody) so that the route's reply says so."""
INFER_TEMPLATES = frozenset({"/v2/models/{ref}/infer", "/v2/models/{ref}/versions/{version}/infer"})


class _Families:
    """A collector's families followed by families built at scrape time, as one
    collector: one exposition, whatever its format."""

    def __init__(self, recorded: Collector | None, extra: Sequence[Metric]) -> None:
        self.recorded = recorded
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        if self.recorded is not None:
            yield from self.recorded.collect()
        yield from self.extra


def encoder_for(accept: str | None) -> tuple[Callable[[Collector], bytes], str]:
    """prometheus_client's choice of format for an Accept header; the text format 0.0.4
    for one it cannot read (its version comparison raises on ``version=x``)."""
    try:
        return choose_encoder(accept or "")
    except (TypeError, ValueError):
        return generate_latest, CONTENT_TYPE


def text_of(families: Sequence[Metric]) -> str:
    """Families in the text format 0.0.4 (for tests and logs)."""
    return generate_latest(_Families(None, families)).decode()


class ServerMetrics:
    """Everything the middleware records, in this server's own registry; scrape-time
    families are added by the route (`exposition`)."""

    def __init__(self, *, model_names: bool = False) -> None:
        if prometheus_values.ValueClass is not prometheus_values.MutexValue:
            raise UsageError(
                "PROMETHEUS_MULTIPROC_DIR is set: prometheus_client would write the server's "
                "metrics (model names among them, if enabled) to files there, shared by "
                "every server in the process; unset it"
            )
        self.model_names = model_names
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "blindinfer_http_requests_total",
            "HTTP requests by route template, method and status.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "blindinfer_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template and method.",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "blindinfer_http_requests_in_flight",
            "HTTP requests being served now.",
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "blindinfer_client_disconnects_total",
            "Requests whose client closed the connection before the request body was "
            'complete (counted with status="499" in blindinfer_http_requests_total), by '
            "route template and method.",
            ("route", "method"),
            registry=self.registry,
        )
        # the gRPC listener's calls (server/grpc/): by method, one of the service's eight
        # (grpc answers any other itself), and status code name: a bounded label space
        self.grpc_calls = Counter(
            "blindinfer_grpc_calls_total",
            "OIP v2 gRPC calls by method and status code.",
            ("method", "code"),
            registry=self.registry,
        )
        self.grpc_latency = Histogram(
            "blindinfer_grpc_call_duration_seconds",
            "Time from a gRPC call's message to its answer, by method.",
            ("method",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_inferences: Counter | None = None
        if model_names:
            self.model_inferences = Counter(
                "blindinfer_model_inferences_total",
                "Successful inferences per model (enabled by the operator).",
                ("tenant", "model"),
                registry=self.registry,
            )
        # process_resident_memory_bytes, CPU seconds, open files, start time (Linux /proc)
        ProcessCollector(registry=self.registry)
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def forget_models(self, live: Iterable[tuple[str, str]]) -> None:
        """Keeps the per-model series of the (tenant, name) pairs in `live` only: a
        deleted model's name must not stay in the output for ever."""
        counter = self.model_inferences
        if counter is None:
            return
        keep = frozenset(live)
        for family in counter.collect():
            for sample in family.samples:
                key = (sample.labels["tenant"], sample.labels["model"])
                if sample.name.endswith("_total") and key not in keep:
                    counter.remove(*key)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        series = self._series.get(key)
        if series is None:  # `labels()` is half of the cost: looked up once per label set
            series = self._series.setdefault(
                key,
                (
                    self.requests.labels(route, method, str(status)),
                    self.latency.labels(route, method),
                ),
            )
        series[0].inc()
        series[1].observe(seconds)

    def observe_grpc_call(self, method: str, code: str, seconds: float) -> None:
        self.grpc_calls.labels(method, code).inc()
        self.grpc_latency.labels(method).observe(seconds)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value, 0 if it was never recorded (for tests and the bench)."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def render(self) -> str:
        """The recorded families in the text format 0.0.4."""
        return generate_latest(self.registry).decode()

    def exposition(self, accept: str | None, extra: Sequence[Metric] = ()) -> tuple[bytes, str]:
        """The recorded families then `extra`, in the format `accept` asks for; and the
        Content-Type that says which."""
        encode, content_type = encoder_for(accept)
        return encode(_Families(self.registry, extra)), content_type


# --------------------------------------------------------------------------- middleware


def route_template(routes: Iterable[BaseRoute], scope: Scope) -> tuple[str, dict[str, str]]:
    """The template of the route the router will pick (as Starlette's router decides:
    the first full match, else the first partial one, i.e. a 405), and its path params."""
    partial: tuple[str, dict[str, str]] | None = None
    for route in routes:
        match, child = route.matches(scope)
        path = getattr(route, "path", None)
        if match is Match.NONE or not isinstance(path, str):
            continue
        found = (path, dict(child.get("path_params", {})))
        if match is Match.FULL:
            return found
        if partial is None:
            partial = found
    return partial if partial is not None else (UNMATCHED, {})


def routed_template(routes: Iterable[BaseRoute], scope: Scope) -> tuple[str, dict[str, str]]:
    """`route_template`, after the app ran: the route Starlette's router chose is in the
    scope (`scope["route"]`, same rule), so the routes are matched once per request, not
    twice. A request refused before routing (415, 429, 503, an error) has none: matched
    here then, as before."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if route is None or not isinstance(path, str):
        return route_template(routes, scope)
    return path, scope.get("path_params", {})


def method_label(scope: Scope) -> str:
    """The request's method as a label: one of METHODS, else "other"."""
    method = str(scope.get("method", "")).upper()
    return method if method in METHODS else OTHER_METHOD


class MetricsMiddleware:
    """Counts every HTTP request by route template, method and status, and times it.

    Register it around the router (``app.add_middleware(MetricsMiddleware, metrics=m)``).
    An exception that escapes before a response started is counted as 500, which is what
    Starlette's outermost error middleware then answers, unless the client had already
    gone (the app was told ``http.disconnect`` before any response): a request nobody
    waits for any more is a client disconnect, whatever the app did next.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        owner = scope.get("app")
        method = method_label(scope)
        status = 500
        started = False
        client_gone = False

        async def receive_and_watch() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect" and not started:
                client_gone = True
            return message

        async def send_and_watch(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
            await send(message)

        self.metrics.in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive_and_watch, send_and_watch)
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.in_flight.dec()
            template, params = routed_template(getattr(owner, "routes", ()), scope)
            if status == CLIENT_CLOSED_REQUEST or (client_gone and not started):
                status = CLIENT_CLOSED_REQUEST
                self.metrics.client_disconnects.labels(template, method).inc()
            self.metrics.observe_request(template, method, status, elapsed)
            if (
                self.metrics.model_inferences is not None
                and template in INFER_TEMPLATES
                and 200 <= status < 300
            ):
                self._count_model(owner, scope, params.get("ref"))

    def _count_model(self, owner: object, scope: Scope, ref: str | None) -> None:
        """Labels by the record the route ran: same principal, same resolution rule."""
        counter = self.metrics.model_inferences
        state = getattr(getattr(owner, "state", None), "blindinfer", None)
        if counter is None or state is None or ref is None:
            return
        try:
            principal = state.authenticator.authenticate(Headers(scope=scope).get("authorization"))
            record = state.resolve(principal, ref)
        except BlindInferError:  # deleted meanwhile: not counted rather than mislabelled
            return
        counter.labels(str(record.owner), str(record.name)).inc()


def install(app: Starlette, *, model_names: bool = False) -> ServerMetrics:
    """Adds the middleware to `app` (before it starts) and keeps the metrics where the
    /metrics route finds them (``app.state.metrics``)."""
    metrics = ServerMetrics(model_names=model_names)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.metrics = metrics
    return metrics
