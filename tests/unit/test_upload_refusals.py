"""Ordinary accidents, in-process: what can be refused is refused before a byte of the
body is read; a client gone mid-body is counted as a disconnect (499), never a 500, and
leaves nothing stored; early refusals of large bodies close the connection."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from blindinfer.server import connection
from blindinfer.server.app import build_state, close_state, create_app
from blindinfer.server.auth import generate_api_key
from blindinfer.server.bodies import DRAIN_LIMIT, CloseUnreadBodies, human_size
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.metrics import MetricsMiddleware, ServerMetrics
from blindinfer.server.routes.repository import check_model_name
from blindinfer.server.state import ServerState
from blindinfer.server.tls import make_tls_identity
from blindinfer.store.errors import InvalidModelNameError
from blindinfer.tee.simulation.platform import SimulationPlatform
from support import onnx_models as zoo

IDENTITY = make_tls_identity()
MAX_MODEL = 200_000
MAX_REQUEST = 50_000
UPLOAD = "/v2/repository/models/{name}/upload"
HUGE = 87 << 20


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def error(self, status: int, code: str) -> str:
        assert self.status == status, self.body
        document = json.loads(self.body)
        assert set(document) == {"error", "code"} and document["code"] == code
        return str(document["error"])


_BUILT: list[ServerState] = []


@pytest.fixture(autouse=True)
def _close_apps() -> Iterator[None]:
    yield
    while _BUILT:
        close_state(_BUILT.pop())  # its workers and its private store


def _app(tmp_path: Path, *, keys: str = "", max_models: int = 8) -> Starlette:
    auth_file = None
    if keys:
        auth_file = tmp_path / "auth.toml"
        auth_file.write_text(keys)
    config = ServerConfig(
        simulation=True,
        limits=Limits(
            max_model_bytes=MAX_MODEL, max_request_bytes=MAX_REQUEST, max_models=max_models
        ),
        auth_file=str(auth_file) if auth_file else None,
    )
    state = build_state(config, SimulationPlatform(bytes(32), isvprodid=1, isvsvn=1), IDENTITY)
    _BUILT.append(state)
    return create_app(state)


def _call(
    app: Any,
    method: str,
    path: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: Iterable[bytes | None] = (),
    final: bytes | None = None,
) -> Reply:
    """Runs one request. receive() gives `body` in order (bytes: a chunk with more to
    come; None: the client disconnected), then `final` as the last chunk. Asked for more
    than that, receive() fails the test: the app read a body it could refuse without."""
    target, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": target,
        "raw_path": target.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 9924),
    }
    pending: list[dict[str, Any]] = [
        {"type": "http.disconnect"}
        if chunk is None
        else {"type": "http.request", "body": chunk, "more_body": True}
        for chunk in body
    ]
    if final is not None:
        pending.append({"type": "http.request", "body": final, "more_body": False})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not pending:
            raise AssertionError("the app read the body although it could refuse without")
        return pending.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    names = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return Reply(int(start["status"]), names, content)


def _upload(app: Any, name: str, data: bytes, headers: Iterable[tuple[str, str]] = ()) -> Reply:
    return _call(
        app,
        "PUT",
        f"/v2/repository/models/{name}/upload",
        headers=[*_length(len(data)), *headers],
        final=data,
    )


REQUESTS = "blindinfer_http_requests_total"
DISCONNECTS = "blindinfer_client_disconnects_total"


def _metrics(app: Starlette) -> ServerMetrics:
    metrics: ServerMetrics = app.state.metrics
    return metrics


def _stats(app: Starlette) -> tuple[int, int]:
    stats = app.state.blindinfer.registry.stats()
    return stats.models, stats.stored_bytes


def _length(size: int) -> list[tuple[str, str]]:
    return [("content-length", str(size)), ("content-type", "application/octet-stream")]


# ------------------------------------------------------------------ disconnects


def test_a_client_gone_mid_upload_is_a_disconnect_not_a_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = _app(tmp_path)
    before = _stats(app)
    caplog.set_level(logging.INFO)
    caplog.clear()  # the start-up's own warnings (open mode)
    reply = _call(
        app,
        "PUT",
        "/v2/repository/models/half/upload",
        headers=_length(150_000),
        body=[bytes(50_000), None],
    )
    assert reply.error(499, "client_disconnected")
    metrics = _metrics(app)
    assert metrics.value(DISCONNECTS, route=UPLOAD, method="PUT") == 1
    assert metrics.value(REQUESTS, route=UPLOAD, method="PUT", status="499") == 1
    assert metrics.value(REQUESTS, route=UPLOAD, method="PUT", status="500") == 0
    assert _stats(app) == before
    assert app.state.blindinfer.registry.records() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    lines = [r.getMessage() for r in caplog.records if r.name == "blindinfer.server"]
    assert lines == [f"a client disconnected before its request body was complete (PUT {UPLOAD})"]
    text = metrics.render()
    assert "half" not in text
    # prometheus_client's format: labels sorted by name, values as floats
    assert f'{DISCONNECTS}{{method="PUT",route="{UPLOAD}"}} 1.0' in text


def test_a_client_gone_mid_inference_request_is_counted_the_same(tmp_path: Path) -> None:
    app = _app(tmp_path)
    assert _upload(app, "mlp", zoo.model_bytes(zoo.mlp_model())).status == 201
    reply = _call(
        app, "POST", "/v2/models/mlp/infer", headers=_length(40_000), body=[b'{"inp', None]
    )
    reply.error(499, "client_disconnected")
    metrics = _metrics(app)
    infer = "/v2/models/{ref}/infer"
    assert metrics.value(DISCONNECTS, route=infer, method="POST") == 1
    assert metrics.value(REQUESTS, route=infer, method="POST", status="500") == 0


# ------------------------------------------------------------------ early refusals

ADMIN, ADMIN_SHA = generate_api_key()
OWNER, OWNER_SHA = generate_api_key()
USER, USER_SHA = generate_api_key()
TENANTS = f"""
[[tenant]]
name = "ops"
  [[tenant.key]]
  id = "admin"
  role = "admin"
  sha256 = "{ADMIN_SHA}"
[[tenant]]
name = "a"
max_models = 1
max_stored_bytes = 150000
  [[tenant.key]]
  id = "owner"
  role = "owner"
  sha256 = "{OWNER_SHA}"
  [[tenant.key]]
  id = "user"
  role = "user"
  sha256 = "{USER_SHA}"
"""


def _key(key: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {key}")


def test_a_declared_size_over_the_limit_is_refused_before_the_body(tmp_path: Path) -> None:
    app = _app(tmp_path)
    reply = _call(app, "PUT", "/v2/repository/models/big/upload", headers=_length(HUGE))
    message = reply.error(413, "payload_too_large")
    assert message == (
        f"the model is {HUGE} bytes (87.0 MiB); the limit is {MAX_MODEL} bytes "
        "(195.3 KiB, --max-model-bytes)"
    )
    assert reply.headers["connection"] == "close"  # a client still sending hears it now
    assert _metrics(app).value(REQUESTS, route=UPLOAD, method="PUT", status="413") == 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bad name", "'bad name' is not a valid model name: a name has 1 to 128 characters"),
        (".hidden", "'.hidden' is not a valid model name"),
        ("a" * 200, "'" + "a" * 64 + "'... is not a valid model name"),
        ("m-" + "0" * 32, "cannot be a model name: it has the form of a model_id"),
        ("ab" * 32, "cannot be a model name"),
    ],
)
def test_an_invalid_name_is_refused_before_the_body(
    tmp_path: Path, name: str, expected: str
) -> None:
    app = _app(tmp_path)
    reply = _call(app, "PUT", f"/v2/repository/models/{name}/upload", headers=_length(HUGE))
    message = reply.error(400, "invalid_model_name")
    assert message.startswith(expected) or (expected.startswith("cannot") and expected in message)


def test_the_name_message_says_which_names_are_allowed() -> None:
    with pytest.raises(InvalidModelNameError) as caught:
        check_model_name("résumé model")
    assert str(caught.value) == (
        "'résumé model' is not a valid model name: a name has 1 to 128 characters, each a "
        "letter (A-Z, a-z), a digit, '_', '.' or '-', and starts with a letter or digit, e.g. "
        "'classifier-v2'; or upload to '_' to have the model named after its model_id"
    )
    assert check_model_name("classifier-v2.onnx") == "classifier-v2.onnx"


@pytest.mark.parametrize(
    ("query", "code"),
    [("share=Bad%20Tenant", "invalid_parameter"), ("receipt=2", "invalid_parameter")],
)
def test_a_bad_query_is_refused_before_the_body(tmp_path: Path, query: str, code: str) -> None:
    app = _app(tmp_path)
    reply = _call(app, "PUT", f"/v2/repository/models/m/upload?{query}", headers=_length(HUGE))
    reply.error(400, code)


def test_keys_and_roles_are_checked_before_the_body(tmp_path: Path) -> None:
    app = _app(tmp_path, keys=TENANTS)
    path = "/v2/repository/models/m/upload"
    missing = _call(app, "PUT", path, headers=_length(HUGE))
    missing.error(401, "unauthorized")
    assert missing.headers["www-authenticate"] == 'Bearer realm="blindinfer"'
    unknown = _call(app, "PUT", path, headers=[*_length(HUGE), _key(generate_api_key()[0])])
    assert unknown.error(401, "unauthorized") == "the API key is not known to this server"
    user = _call(app, "PUT", path, headers=[*_length(HUGE), _key(USER)])
    assert user.error(403, "forbidden") == "the 'user' role may not upload or replace models"
    assert user.headers["connection"] == "close"


def test_an_exhausted_quota_is_refused_before_the_body(tmp_path: Path) -> None:
    app = _app(tmp_path, keys=TENANTS)
    # stored bytes: 150000 allowed, 190000 declared
    over = _call(
        app, "PUT", "/v2/repository/models/m/upload", headers=[*_length(190_000), _key(OWNER)]
    )
    assert "over its quota of 150000 bytes" in over.error(403, "quota_exceeded")
    assert _upload(app, "first", zoo.model_bytes(zoo.mlp_model()), [_key(OWNER)]).status == 201
    # model count: one allowed, one stored
    full = _call(
        app, "PUT", "/v2/repository/models/second/upload", headers=[*_length(1000), _key(OWNER)]
    )
    assert full.error(403, "quota_exceeded") == (
        "tenant 'a' has 1 models and may store at most 1; delete one before uploading another"
    )


def test_a_full_server_refuses_new_models_before_the_body(tmp_path: Path) -> None:
    app = _app(tmp_path, max_models=1)
    model = zoo.model_bytes(zoo.mlp_model())
    assert _upload(app, "only", model).status == 201
    for name in ("other", "_"):
        reply = _call(app, "PUT", f"/v2/repository/models/{name}/upload", headers=_length(1000))
        reply.error(507, "store_full")
    # the same model under its own name is still an idempotent success: that needs the body
    again = _upload(app, "only", model)
    assert again.status == 200 and json.loads(again.body)["created"] is False


def test_inference_and_load_bodies_over_the_request_limit_are_refused_before(
    tmp_path: Path,
) -> None:
    app = _app(tmp_path)
    assert _upload(app, "mlp", zoo.model_bytes(zoo.mlp_model())).status == 201
    infer = _call(app, "POST", "/v2/models/mlp/infer", headers=_length(HUGE))
    assert infer.error(413, "payload_too_large").endswith(
        f"the limit is {MAX_REQUEST} bytes (48.8 KiB, --max-request-bytes)"
    )
    assert infer.headers["connection"] == "close"
    json_body = [("content-length", str(HUGE)), ("content-type", "application/json")]
    load = _call(app, "POST", "/v2/repository/models/x/load", headers=json_body)
    load.error(413, "payload_too_large")
    # the model must exist before its inputs are read
    _call(app, "POST", "/v2/models/nope/infer", headers=_length(HUGE)).error(404, "unknown_model")


def test_a_small_unread_body_keeps_the_connection(tmp_path: Path) -> None:
    app = _app(tmp_path)
    reply = _call(app, "PUT", "/v2/repository/models/.bad/upload", headers=_length(DRAIN_LIMIT))
    reply.error(400, "invalid_model_name")
    assert "connection" not in reply.headers


# ------------------------------------------------------------------ pieces


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    if scope["path"] == "/read":
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    ("path", "headers", "body", "closes"),
    [
        ("/refuse", [("content-length", str(DRAIN_LIMIT + 1))], [], True),
        ("/refuse", [("transfer-encoding", "chunked")], [], True),
        ("/refuse", [("content-length", str(DRAIN_LIMIT))], [], False),
        ("/refuse", [], [], False),
        ("/read", [("content-length", str(2 * DRAIN_LIMIT))], [bytes(2 * DRAIN_LIMIT)], False),
        ("/read", [("transfer-encoding", "chunked")], [b"abc"], False),
    ],
)
def test_close_unread_bodies(
    path: str, headers: list[tuple[str, str]], body: list[bytes], closes: bool
) -> None:
    final = body[-1] if body else None
    reply = _call(CloseUnreadBodies(_answer), "POST", path, headers=headers, final=final)
    assert reply.status == 200
    assert (reply.headers.get("connection") == "close") is closes


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 87 << 20, 3 << 30)] == [
        "0 bytes",
        "1023 bytes",
        "1.0 KiB",
        "87.0 MiB",
        "3.0 GiB",
    ]


@pytest.mark.parametrize("then", ["raise", "return"])
def test_whatever_an_app_does_after_the_client_left_is_no_server_error(then: str) -> None:
    metrics = ServerMetrics()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.disconnect"
        if then == "raise":
            raise RuntimeError("the body was never complete")

    middleware = MetricsMiddleware(app, metrics)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent")

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    if then == "raise":
        with pytest.raises(RuntimeError):
            asyncio.run(middleware(scope, receive, send))
    else:
        asyncio.run(middleware(scope, receive, send))
    assert metrics.value(REQUESTS, route="unmatched", method="POST", status="499") == 1
    assert metrics.value(REQUESTS, route="unmatched", method="POST", status="500") == 0
    assert metrics.value(DISCONNECTS, route="unmatched", method="POST") == 1


class _FakeTransport:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def write(self, data: bytes) -> None:
        self.calls.append("write")


class _Cycle:
    def __init__(self, more_body: bool, disconnected: bool = False) -> None:
        self.more_body = more_body
        self.disconnected = disconnected


@pytest.mark.parametrize(
    ("cycle", "expected"),
    [
        (None, ["close", "resume_reading"]),
        (_Cycle(more_body=False), ["close", "resume_reading"]),
        (_Cycle(more_body=True, disconnected=True), ["close", "resume_reading"]),
        # the answer written, reading stops (resuming is ignored), the abort comes later
        (_Cycle(more_body=True), ["pause_reading", "abort"]),
    ],
)
def test_closing_with_an_unfinished_body_stops_reading_then_aborts(
    monkeypatch: pytest.MonkeyPatch, cycle: _Cycle | None, expected: list[str]
) -> None:
    monkeypatch.setattr(connection, "LINGER_S", 0.01)

    class Protocol(asyncio.Protocol):
        def __init__(self) -> None:
            self.transport: Any = None
            self.cycle = cycle

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

    protocol = connection.abort_unread_bodies(Protocol)()
    raw = _FakeTransport()

    async def run() -> None:
        protocol.connection_made(raw)  # type: ignore[arg-type]
        wrapped = protocol.transport  # type: ignore[attr-defined]
        wrapped.write(b"answer")
        wrapped.close()
        wrapped.close()  # a second close changes nothing
        wrapped.resume_reading()  # ignored while lingering
        assert wrapped.is_closing()
        await asyncio.sleep(0.05)

    asyncio.run(run())
    assert raw.calls == ["write", *expected]


# ------------------------------------------------------------------ streamed bodies
# The body's SHA-256 is computed on a thread while it streams (server/upload_digest.py).


def test_an_upload_in_many_chunks_is_stored_under_the_sha256_of_all_its_bytes(
    tmp_path: Path,
) -> None:
    app = _app(tmp_path)
    data = zoo.model_bytes(zoo.mlp_model())
    cuts = [0, 1, 100, 4096, 5000, len(data) // 2, len(data) - 1, len(data)]
    pieces = [data[start:end] for start, end in itertools.pairwise(cuts)]
    reply = _call(
        app,
        "PUT",
        "/v2/repository/models/pieces/upload",
        headers=_length(len(data)),
        body=pieces[:-1],
        final=pieces[-1],
    )
    assert reply.status == 201, reply.body
    document = json.loads(reply.body)
    assert (document["sha256"], document["size"]) == (hashlib.sha256(data).hexdigest(), len(data))
    (record,) = app.state.blindinfer.registry.records()
    assert record.sha256 == hashlib.sha256(data).hexdigest()


def test_a_body_without_length_is_refused_at_the_chunk_that_passes_the_limit(
    tmp_path: Path,
) -> None:
    """Four chunks of 60 000 bytes: the fourth passes the 200 000-byte limit and is
    refused; `_call` fails the test if the route asks for a fifth."""
    app = _app(tmp_path)
    before = _stats(app)
    reply = _call(
        app,
        "PUT",
        "/v2/repository/models/endless/upload",
        headers=[("transfer-encoding", "chunked"), ("content-type", "application/octet-stream")],
        body=[bytes(60_000)] * 4,
    )
    assert reply.error(413, "payload_too_large") == (
        f"the model is larger than the limit of {MAX_MODEL} bytes (195.3 KiB, --max-model-bytes)"
    )
    assert _stats(app) == before
    assert app.state.blindinfer.registry.records() == []


def test_a_streamed_model_refused_by_validation_leaves_no_sealed_file(tmp_path: Path) -> None:
    app = _app(tmp_path)
    registry = app.state.blindinfer.registry
    data = zoo.invalid_model_bytes()["random"]
    reply = _call(
        app,
        "PUT",
        "/v2/repository/models/noise/upload",
        headers=_length(len(data)),
        body=[data[:1000], data[1000:3000]],
        final=data[3000:],
    )
    reply.error(400, "invalid_model")
    assert registry.records() == []
    assert sorted(p.name for p in (registry.directory / "blobs").iterdir()) == []
    assert _stats(app) == (0, 0)
