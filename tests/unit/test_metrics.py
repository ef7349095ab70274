"""GET /metrics in-process: exact request counts after a known sequence, a consistent
latency histogram, route templates only (never a model name from a path unless the operator
allows it), never tensor content, admin-only under authentication, and output that parses
as the Prometheus text format 0.0.4."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from starlette.applications import Starlette
from starlette.testclient import TestClient

from blindinfer.errors import UsageError
from blindinfer.server import metrics as server_metrics
from blindinfer.server.app import build_state, close_state, create_app
from blindinfer.server.auth import ENV_VARIABLE, generate_api_key
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.metrics import CONTENT_TYPE, ServerMetrics, route_template
from blindinfer.server.tls import make_tls_identity
from blindinfer.tee.simulation.platform import SimulationPlatform

MRE = bytes(range(32))
IDENTITY = make_tls_identity()
SECRET = "secret-name"
UNKNOWN = "never-uploaded-secret"
# Distinctive tensor values: their decimal text cannot occur in counts, bytes or latencies.
X_VALUES = [31415.926, -27182.818]
Y_TEXT = ("62831.85", "54365.63")  # y = 2x, as any JSON encoder would start them
REQUEST_ID = "req-confidential-7f3a"


def _model() -> bytes:
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["f"], value_float=2.0),
            helper.make_node("Mul", ["x", "f"], ["y"]),
        ],
        "metrics",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


MODEL = _model()
INFER = {
    "id": REQUEST_ID,
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": X_VALUES}],
}


def _app(*, model_names: bool = False) -> Starlette:
    config = ServerConfig(
        simulation=True, limits=Limits(max_models=4), metrics_model_names=model_names
    )
    state = build_state(config, SimulationPlatform(MRE, isvprodid=4, isvsvn=6), IDENTITY)
    return create_app(state)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(_app(), raise_server_exceptions=False) as c:
        yield c


# ----------------------------------------------------------------------------- parser

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"'
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL},?)*)\}})? (\S+)")
_VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|Inf)|NaN")

Key = tuple[str, frozenset[tuple[str, str]]]


def parse_exposition(text: str) -> tuple[dict[Key, float], dict[str, str]]:
    """Samples {(name, labels): value} and types {family: type}; fails on any deviation
    from the text format (unknown line, sample before its TYPE, duplicate series, bad
    escape, bad value, family declared twice, missing final newline)."""
    assert text.endswith("\n")
    samples: dict[Key, float] = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name), line
            assert name not in helps, f"HELP twice: {line}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}, line
            assert name not in types, f"TYPE twice: {line}"
            types[name] = kind
            continue
        assert not line.startswith("#") and line.strip(), f"unexpected line {line!r}"
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a sample: {line!r}"
        name, label_text, value = match.group(1), match.group(2) or "", match.groups()[-1]
        assert _VALUE.fullmatch(value), line
        labels = {
            k: v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
            for k, v in re.findall(_LABEL, label_text)
        }
        family = name
        if types.get(name) is None:
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert types.get(family) == "histogram", f"sample before its TYPE: {line!r}"
        if family != name or types[family] == "histogram":
            assert name != family, f"bare histogram sample: {line!r}"
            assert ("le" in labels) == name.endswith("_bucket"), line
        key = (name, frozenset(labels.items()))
        assert key not in samples, f"duplicate series: {line!r}"
        samples[key] = float(value.replace("Inf", "inf"))
    return samples, types


def _scrape(client: TestClient, **kwargs: Any) -> tuple[str, dict[Key, float]]:
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    samples, _ = parse_exposition(response.text)
    return response.text, samples


def _value(samples: dict[Key, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _requests(samples: dict[Key, float]) -> dict[tuple[str, str, str], float]:
    return {
        (d["route"], d["method"], d["status"]): v
        for (name, labels), v in samples.items()
        if name == "blindinfer_http_requests_total"
        for d in [dict(labels)]
    }


def _check_histograms(samples: dict[Key, float]) -> None:
    """Per series: buckets cumulative (monotonic), +Inf bucket == count, count == the
    requests counted for that route and method, sum >= 0."""
    base = "blindinfer_http_request_duration_seconds"
    per_series: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
    for (name, labels), value in samples.items():
        if name == f"{base}_bucket":
            d = dict(labels)
            le = float(d.pop("le").replace("Inf", "inf"))
            per_series.setdefault(frozenset(d.items()), []).append((le, value))
    requests = _requests(samples)
    assert per_series
    for series, buckets in per_series.items():
        buckets.sort()
        bounds = [le for le, _ in buckets]
        assert bounds[:-1] == list(server_metrics.LATENCY_BUCKETS)
        assert math.isinf(bounds[-1])
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"not monotonic: {counts}"
        count = samples[(f"{base}_count", series)]
        assert counts[-1] == count
        assert samples[(f"{base}_sum", series)] >= 0
        d = dict(series)
        expected = sum(
            v for (r, m, _), v in requests.items() if (r, m) == (d["route"], d["method"])
        )
        assert count == expected


# ----------------------------------------------------------------------------- tests


def test_exact_counts_after_a_known_sequence(client: TestClient) -> None:
    for _ in range(3):
        assert client.get("/v2").status_code == 200
    for _ in range(2):
        assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v3/nothing").status_code == 404
    assert client.delete("/v2").status_code == 405
    assert client.request("BREW", "/v2").status_code == 405
    assert client.put(f"/v2/repository/models/{SECRET}/upload", content=MODEL).status_code == 201
    for _ in range(2):
        assert client.post(f"/v2/models/{SECRET}/infer", json=INFER).status_code == 200
    assert client.post(f"/v2/models/{UNKNOWN}/infer", json=INFER).status_code == 404

    text, samples = _scrape(client)
    assert _requests(samples) == {
        ("/v2", "GET", "200"): 3,
        ("/v2/health/live", "GET", "200"): 2,
        ("unmatched", "GET", "404"): 1,
        ("/v2", "DELETE", "405"): 1,
        ("/v2", "other", "405"): 1,
        ("/v2/repository/models/{name}/upload", "PUT", "201"): 1,
        ("/v2/models/{ref}/infer", "POST", "200"): 2,
        ("/v2/models/{ref}/infer", "POST", "404"): 1,
    }
    _check_histograms(samples)
    # The scrape that rendered the text is counted once it is over: the next one sees it.
    _, again = _scrape(client)
    assert (
        _value(
            again, "blindinfer_http_requests_total", route="/metrics", method="GET", status="200"
        )
        == 1
    )
    _check_histograms(again)
    assert _value(again, "blindinfer_http_requests_in_flight") == 1  # the scrape itself

    # Scrape-time gauges.
    assert _value(samples, "blindinfer_models") == 1
    assert _value(samples, "blindinfer_models_loaded") == 1
    assert _value(samples, "blindinfer_memory_budget_bytes") == Limits().memory_budget_bytes
    assert _value(samples, "blindinfer_memory_used_bytes") > 0
    assert _value(samples, "blindinfer_stored_bytes") >= len(MODEL)
    assert _value(samples, "blindinfer_open_mode") == 1
    assert _value(samples, "blindinfer_worker_restarts_total", worker="0") == 0
    assert _value(samples, "blindinfer_worker_up", worker="0") == 1
    assert _value(samples, "process_resident_memory_bytes") > 1 << 20
    _assert_confidential(text)


def _assert_confidential(text: str, *, names_allowed: bool = False) -> None:
    if not names_allowed:
        assert SECRET not in text
    assert UNKNOWN not in text
    assert "secret" not in text.replace(SECRET, "") if names_allowed else "secret" not in text
    assert REQUEST_ID not in text
    for tensor_text in (*map(str, X_VALUES), *Y_TEXT, "31415", "27182"):
        assert tensor_text not in text
    assert re.search(r"\bm-[0-9a-f]{32}\b", text) is None  # model ids
    assert re.search(r"\b[0-9a-f]{64}\b", text) is None  # model hashes


def test_model_names_only_when_the_operator_allows_them() -> None:
    with TestClient(_app(model_names=True), raise_server_exceptions=False) as client:
        upload = client.put(f"/v2/repository/models/{SECRET}/upload", content=MODEL)
        assert upload.status_code == 201
        model_id = upload.json()["model_id"]
        assert client.post(f"/v2/models/{SECRET}/infer", json=INFER).status_code == 200
        assert client.post(f"/v2/models/{model_id}/infer", json=INFER).status_code == 200
        assert client.post(f"/v2/models/{SECRET}/versions/1/infer", json=INFER).status_code == 200
        assert client.post(f"/v2/models/{UNKNOWN}/infer", json=INFER).status_code == 404
        text, samples = _scrape(client)
    # By registered name, whatever reference the caller used; unknown names never appear.
    assert [
        (dict(labels), v)
        for (name, labels), v in samples.items()
        if name == "blindinfer_model_inferences_total"
    ] == [({"tenant": "local", "model": SECRET}, 3)]
    # Request counts still by template.
    assert _requests(samples)[("/v2/models/{ref}/infer", "POST", "200")] == 2
    assert _requests(samples)[("/v2/models/{ref}/versions/{version}/infer", "POST", "200")] == 1
    _check_histograms(samples)
    _assert_confidential(text, names_allowed=True)


def test_no_per_model_family_by_default(client: TestClient) -> None:
    assert client.put(f"/v2/repository/models/{SECRET}/upload", content=MODEL).status_code == 201
    assert client.post(f"/v2/models/{SECRET}/infer", json=INFER).status_code == 200
    text, _ = _scrape(client)
    assert "blindinfer_model_inferences_total" not in text
    _assert_confidential(text)


def test_admin_only_when_authentication_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    admin, admin_sha = generate_api_key()
    user, user_sha = generate_api_key()
    monkeypatch.setenv(ENV_VARIABLE, f"ops:admin:{admin_sha},team:owner:{user_sha}")
    with TestClient(_app(), raise_server_exceptions=False) as client:
        assert client.get("/metrics").status_code == 401
        bad = client.get("/metrics", headers={"Authorization": f"Bearer {user}"})
        assert bad.status_code == 403
        assert client.get(f"/v2/models/{SECRET}").status_code == 401
        text, samples = _scrape(client, headers={"Authorization": f"Bearer {admin}"})
    assert _requests(samples) == {
        ("/metrics", "GET", "401"): 1,
        ("/metrics", "GET", "403"): 1,
        ("/v2/models/{ref}", "GET", "401"): 1,
    }
    assert _value(samples, "blindinfer_open_mode") == 0
    assert admin not in text
    assert user not in text
    _assert_confidential(text)


def test_an_exception_escaping_the_app_counts_as_500() -> None:
    metrics = server_metrics.ServerMetrics()

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    middleware = server_metrics.MetricsMiddleware(broken, metrics)
    client = TestClient(middleware, raise_server_exceptions=False)
    client.get("/anything/at/all")
    requests = "blindinfer_http_requests_total"
    assert metrics.value(requests, route="unmatched", method="GET", status="500") == 1
    assert metrics.value("blindinfer_http_requests_in_flight") == 0
    assert "anything" not in metrics.render()


# ----------------------------------------------------------------------------- pieces


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    metrics = ServerMetrics()
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
        metrics.observe_request("/r", "GET", 200, seconds)
    samples, types = parse_exposition(metrics.render())
    base = "blindinfer_http_request_duration_seconds"
    assert types[base] == "histogram"
    r = {"route": "/r", "method": "GET"}
    # prometheus_client writes bounds as Go does: "1.0", not "1"
    assert _value(samples, f"{base}_bucket", **r, le="0.1") == 2
    assert _value(samples, f"{base}_bucket", **r, le="1.0") == 4
    assert _value(samples, f"{base}_bucket", **r, le="+Inf") == 5
    assert _value(samples, f"{base}_count", **r) == 5
    assert _value(samples, f"{base}_sum", **r) == pytest.approx(8.65)
    assert _requests(samples) == {("/r", "GET", "200"): 5}


def test_label_escaping_round_trips() -> None:
    """The library's escaping, read back by this module's parser (which checks every
    other test's output)."""
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("c_total", 'a "help"\nline', ("v",), registry=registry)
    odd = 'quote " backslash \\ newline \n end'
    counter.labels(odd).inc()
    counter.labels(odd).inc(2)
    text = prometheus_client.generate_latest(registry).decode()
    samples, _ = parse_exposition(text)
    assert samples[("c_total", frozenset({("v", odd)}))] == 3
    assert 'v="quote \\" backslash \\\\ newline \\n end"' in text


def test_route_template_prefers_full_match_then_partial() -> None:
    app = _app()
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/x/infer",
        "root_path": "",
    }
    assert route_template(app.routes, scope) == ("/v2/models/{ref}/infer", {"ref": "x"})
    scope["method"] = "GET"  # only a partial match: Starlette answers 405 on it
    assert route_template(app.routes, scope)[0] == "/v2/models/{ref}/infer"
    scope["path"] = "/nowhere/secret"
    assert route_template(app.routes, scope) == ("unmatched", {})
    close_state(app.state.blindinfer)


def test_deleted_model_names_are_forgotten() -> None:
    """Issue 21 item 11: under --metrics-model-names a deleted model's series (its name)
    must leave the output, not stay there for ever; other models' series stay."""
    with TestClient(_app(model_names=True), raise_server_exceptions=False) as client:
        for name in (SECRET, "kept-model"):
            reply = client.put(f"/v2/repository/models/{name}/upload", content=MODEL)
            assert reply.status_code == 201
            assert client.post(f"/v2/models/{name}/infer", json=INFER).status_code == 200
        text, _ = _scrape(client)
        assert f'model="{SECRET}"' in text and 'model="kept-model"' in text
        assert client.delete(f"/v2/repository/models/{SECRET}").status_code == 200
        text, samples = _scrape(client)
    assert SECRET not in text
    assert [
        (dict(labels), v)
        for (name, labels), v in samples.items()
        if name == "blindinfer_model_inferences_total"
    ] == [({"tenant": "local", "model": "kept-model"}, 1)]


def test_forget_models_keeps_the_live_series_only() -> None:
    metrics = ServerMetrics(model_names=True)
    assert metrics.model_inferences is not None
    metrics.model_inferences.labels("a", "x").inc()
    metrics.model_inferences.labels("a", "y").inc(2)
    metrics.forget_models([("a", "y"), ("b", "never-counted")])
    name = "blindinfer_model_inferences_total"
    assert metrics.value(name, tenant="a", model="x") == 0
    assert metrics.value(name, tenant="a", model="y") == 2
    assert 'model="x"' not in metrics.render()


def _names(registry: prometheus_client.CollectorRegistry) -> set[str]:
    return {family.name for family in registry.collect()}


def test_each_server_has_its_own_registry_and_nothing_is_global() -> None:
    """Nothing lands in prometheus_client's global REGISTRY, and two servers in one process
    count apart."""
    before = _names(prometheus_client.REGISTRY)
    first, second = _app(), _app()
    assert _names(prometheus_client.REGISTRY) == before
    with (
        TestClient(first, raise_server_exceptions=False) as one,
        TestClient(second, raise_server_exceptions=False) as two,
    ):
        for _ in range(3):
            assert one.get("/v2").status_code == 200
        assert two.get("/v2/health/live").status_code == 200
        _, samples_one = _scrape(one)
        _, samples_two = _scrape(two)
    assert _requests(samples_one) == {("/v2", "GET", "200"): 3}
    assert _requests(samples_two) == {("/v2/health/live", "GET", "200"): 1}
    assert first.state.metrics.registry is not second.state.metrics.registry
    assert _names(prometheus_client.REGISTRY) == before


def test_the_format_is_negotiated_as_prometheus_client_does(client: TestClient) -> None:
    assert client.get("/v2").status_code == 200
    openmetrics = client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert openmetrics.status_code == 200
    assert openmetrics.headers["content-type"].startswith(
        "application/openmetrics-text; version=1.0.0"
    )
    assert openmetrics.text.endswith("# EOF\n")
    assert 'blindinfer_http_requests_total{method="GET",route="/v2",status="200"} 1.0' in (
        openmetrics.text
    )
    # an Accept the library's version comparison cannot read: the text format 0.0.4
    for odd in ("text/plain; version=x", "application/openmetrics-text; version=1.x"):
        reply = client.get("/metrics", headers={"Accept": odd})
        assert reply.status_code == 200
        assert reply.headers["content-type"] == CONTENT_TYPE
        parse_exposition(reply.text)


def test_prometheus_client_multiprocess_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its values are files in PROMETHEUS_MULTIPROC_DIR, shared by every server in the
    process (chosen when prometheus_client is imported): not the per-server registry."""
    monkeypatch.setattr(prometheus_client.values, "ValueClass", object)
    with pytest.raises(UsageError, match="PROMETHEUS_MULTIPROC_DIR"):
        ServerMetrics()


_ACCEPT_PART = st.one_of(
    st.sampled_from(["application/openmetrics-text", "text/plain", "*/*", ""]),
    st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=20),
)
_PARAM = st.tuples(
    st.sampled_from(["version", "escaping", "q", "charset"]),
    st.one_of(
        st.sampled_from(["1.0.0", "0.0.1", "0.0.4", "2", "1.x", "x", "", "allow-utf-8"]),
        st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=8),
    ),
)


@given(
    st.lists(st.tuples(_ACCEPT_PART, st.lists(_PARAM, max_size=3)), max_size=3).map(
        lambda parts: ",".join(
            ";".join([kind, *(f"{k}={v}" for k, v in params)]) for kind, params in parts
        )
    )
)
@settings(max_examples=300, deadline=None)
def test_any_accept_header_gets_a_known_format(accept: str) -> None:
    """The Accept header is parsed by prometheus_client (`choose_encoder`): whatever an
    admin's scraper sends, the answer is one of its formats, never an exception."""
    metrics = _FUZZ_METRICS
    body, content_type = metrics.exposition(accept)
    assert content_type == CONTENT_TYPE or content_type.startswith(
        ("text/plain; version=1.0.0; charset=utf-8", "application/openmetrics-text; version=")
    )
    assert b"blindinfer_http_requests_total" in body


_FUZZ_METRICS = ServerMetrics()
_FUZZ_METRICS.observe_request("/v2", "GET", 200, 0.001)
