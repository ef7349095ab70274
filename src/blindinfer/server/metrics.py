"""Prometheus metrics: a small hand-written registry and the ASGI middleware that feeds it.

Exposition is the Prometheus text format 0.0.4 (``text/plain; version=0.0.4``), written
here rather than with ``prometheus_client`` so that nothing global (default registry,
process collectors) is shared between servers in one process, and no dependency is added.

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

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blindinfer.errors import BlindInferError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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

Labels = tuple[str, ...]
Sample = tuple[Mapping[str, str], float]


# --------------------------------------------------------------------------- exposition


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without a fraction, +Inf, NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _sample_line(name: str, labels: Mapping[str, str], value: float) -> str:
    if labels:
        inner = ",".join(f'{key}="{escape_label(val)}"' for key, val in labels.items())
        return f"{name}{{{inner}}} {format_value(value)}\n"
    return f"{name} {format_value(value)}\n"


def render_family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> str:
    """One metric family: HELP, TYPE, then its samples (``name`` plus labels, value)."""
    lines = [f"# HELP {name} {_escape_help(help_text)}\n", f"# TYPE {name} {kind}\n"]
    lines.extend(_sample_line(name, labels, value) for labels, value in samples)
    return "".join(lines)


# --------------------------------------------------------------------------- metrics


class Counter:
    """A monotonically increasing count per label combination."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {labels}")
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def retain(self, keep: Callable[[Labels], bool]) -> None:
        """Forgets every series whose labels `keep` refuses (e.g. a deleted model's)."""
        with self._lock:
            self._values = {key: value for key, value in self._values.items() if keep(key)}

    def render(self) -> str:
        with self._lock:
            items = sorted(self._values.items())
        return render_family(
            self.name,
            self.kind,
            self.help,
            ((dict(zip(self.labelnames, key, strict=True)), value) for key, value in items),
        )


class Gauge(Counter):
    """A value that goes up and down (e.g. requests in flight)."""

    kind = "gauge"

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        self.inc(*labels, amount=-amount)

    def set(self, value: float, *labels: str) -> None:
        with self._lock:
            self._values[labels] = value


@dataclass(slots=True)
class _Series:
    buckets: list[int]
    count: int = 0
    total: float = 0.0


class Histogram:
    """Observations counted into fixed cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)) or math.isinf(bounds[-1]):
            raise ValueError("buckets must be finite, distinct and increasing")
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self.bounds = bounds
        self._series: dict[Labels, _Series] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {labels}")
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = _Series([0] * len(self.bounds))
            index = bisect_left(self.bounds, value)  # the first bound >= value
            if index < len(self.bounds):  # stored non-cumulative; above all: +Inf only
                series.buckets[index] += 1
            series.count += 1
            series.total += value

    def render(self) -> str:
        with self._lock:
            items = sorted(
                (key, list(s.buckets), s.count, s.total) for key, s in self._series.items()
            )
        lines = [
            f"# HELP {self.name} {_escape_help(self.help)}\n",
            f"# TYPE {self.name} histogram\n",
        ]
        for key, buckets, count, total in items:
            labels = dict(zip(self.labelnames, key, strict=True))
            cumulative = 0
            for bound, hits in zip(self.bounds, buckets, strict=True):
                cumulative += hits
                le = {**labels, "le": format_value(bound)}
                lines.append(_sample_line(f"{self.name}_bucket", le, cumulative))
            lines.append(_sample_line(f"{self.name}_bucket", {**labels, "le": "+Inf"}, count))
            lines.append(_sample_line(f"{self.name}_sum", labels, total))
            lines.append(_sample_line(f"{self.name}_count", labels, count))
        return "".join(lines)


class ServerMetrics:
    """Everything the middleware records; scrape-time gauges are added by the route."""

    def __init__(self, *, model_names: bool = False) -> None:
        self.model_names = model_names
        self.requests = Counter(
            "blindinfer_http_requests_total",
            "HTTP requests by route template, method and status.",
            ("route", "method", "status"),
        )
        self.latency = Histogram(
            "blindinfer_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template and method.",
            ("route", "method"),
        )
        self.in_flight = Gauge(
            "blindinfer_http_requests_in_flight", "HTTP requests being served now."
        )
        self.in_flight.set(0)
        self.client_disconnects = Counter(
            "blindinfer_client_disconnects_total",
            "Requests whose client closed the connection before the request body was "
            'complete (counted with status="499" in blindinfer_http_requests_total), by '
            "route template and method.",
            ("route", "method"),
        )
        self.model_inferences: Counter | None = None
        if model_names:
            self.model_inferences = Counter(
                "blindinfer_model_inferences_total",
                "Successful inferences per model (enabled by the operator).",
                ("tenant", "model"),
            )

    def forget_models(self, live: Iterable[tuple[str, str]]) -> None:
        """Keeps the per-model series of the (tenant, name) pairs in `live` only: a
        deleted model's name must not stay in the output for ever."""
        if self.model_inferences is not None:
            keep = frozenset(live)
            self.model_inferences.retain(lambda labels: labels in keep)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(route, method, str(status))
        self.latency.observe(seconds, route, method)

    def render(self) -> str:
        parts = [
            self.requests.render(),
            self.latency.render(),
            self.in_flight.render(),
            self.client_disconnects.render(),
        ]
        if self.model_inferences is not None:
            parts.append(self.model_inferences.render())
        return "".join(parts)


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
                self.metrics.client_disconnects.inc(template, method)
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
        counter.inc(str(record.owner), str(record.name))


def install(app: Starlette, *, model_names: bool = False) -> ServerMetrics:
    """Adds the middleware to `app` (before it starts) and keeps the metrics where the
    /metrics route finds them (``app.state.metrics``)."""
    metrics = ServerMetrics(model_names=model_names)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.metrics = metrics
    return metrics
