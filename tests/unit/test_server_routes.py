"""The route table of the native app, as the hot path relies on it: no two route
templates can match the same path (so their order, inference first, changes nothing but
how soon the router finds a route), and the inference route's response is what Starlette's
`Response` sends, byte for byte, without the object."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route, Router

from blindinfer.server.app import build_state, close_state, create_app
from blindinfer.server.config import ServerConfig
from blindinfer.server.metrics import route_template, routed_template
from blindinfer.server.respond import raw_headers
from blindinfer.server.tls import make_tls_identity
from blindinfer.tee.simulation.platform import SimulationPlatform


@pytest.fixture(scope="module")
def app() -> Iterator[Starlette]:
    config = ServerConfig(simulation=True)
    state = build_state(config, SimulationPlatform(bytes(32)), make_tls_identity())
    yield create_app(state)
    close_state(state)


def _segments(template: str) -> list[str]:
    return template.strip("/").split("/")


def _overlap(a: str, b: str) -> bool:
    """Whether one path can match both templates ({name} is one segment, [^/]+)."""
    first, second = _segments(a), _segments(b)
    return len(first) == len(second) and all(
        x == y or x.startswith("{") or y.startswith("{") for x, y in zip(first, second, strict=True)
    )


def test_no_two_route_templates_match_one_path(app: Starlette) -> None:
    routes = [r for r in app.routes if isinstance(r, Route)]
    assert len(routes) == len(app.routes)  # no mounts: every route is one template
    templates = sorted({r.path for r in routes})
    assert [(a, b) for a in templates for b in templates if a < b and _overlap(a, b)] == []
    assert routes[0].path == "/v2/models/{ref}/infer"  # the hot route is tried first


SEGMENT = st.sampled_from(["v2", "v1", "models", "m", "versions", "1", "infer", "ready", "x"])


@pytest.fixture(scope="module")
def router(app: Starlette) -> Router:
    """The app's route table, in its order, with endpoints that do nothing."""
    routes = [r for r in app.routes if isinstance(r, Route)]
    return Router(routes=[Route(r.path, _noop, methods=r.methods) for r in routes])


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    segments=st.lists(SEGMENT, min_size=1, max_size=6),
    slash=st.booleans(),
)
def test_metrics_label_the_route_the_router_chose(
    router: Router, method: str, segments: list[str], slash: bool
) -> None:
    """MetricsMiddleware reads the router's choice from the scope after the request
    (`routed_template`); it must be the label `route_template` gives before it."""
    path = "/" + "/".join(segments) + ("/" if slash else "")

    def scope() -> dict[str, Any]:
        return {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}

    expected = route_template(router.routes, scope())
    routed = scope()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    asyncio.run(router(routed, receive, send))
    assert routed_template(router.routes, routed) == expected


async def _noop(request: Any) -> Response:
    return Response(b"")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "42"},
        {"content-type": "application/json"},
        {"Content-Length": "3"},  # given: not added again
        {"X-Odd": "caf\u00e9"},  # latin-1, as Starlette encodes it
    ],
)
def test_the_inference_response_head_is_starlettes(headers: dict[str, str]) -> None:
    body = b"abc"
    assert raw_headers(headers, len(body)) == Response(body, headers=headers).raw_headers
    assert not any(re.search(rb"[A-Z]", name) for name, _ in raw_headers(headers, 3))
