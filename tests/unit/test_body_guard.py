"""The server-wide body budget, the connection settings, and the body deadlines of the
guard in process (the attacks themselves run against a real server in
tests/e2e/test_connection_limits_e2e.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blindinfer.cli.main import _config, build_parser
from blindinfer.errors import UsageError
from blindinfer.runtime.errors import OverloadedError
from blindinfer.server.auth import Authenticator
from blindinfer.server.body_guard import BodyBudget, BodyGuard, receive_within
from blindinfer.server.config import ConnectionLimits, ServerConfig
from blindinfer.server.errors import RequestTimeoutError
from blindinfer.server.quotas import TenantQuotas


def test_the_budget_bounds_bodies_and_their_bytes_and_gives_them_back() -> None:
    budget = BodyBudget(max_bodies=2, max_bytes=100)
    budget.open()
    budget.open()
    with pytest.raises(OverloadedError, match="--max-concurrent-bodies"):
        budget.open()
    budget.grow(60)
    with pytest.raises(OverloadedError, match="--max-body-buffer-bytes"):
        budget.grow(41)
    budget.grow(40)
    assert budget.usage == (2, 100)
    budget.body_done()  # complete: no longer received, its bytes held until the end
    budget.open()
    assert budget.usage == (2, 100)
    budget.close(60, still_open=False)
    budget.close(40, still_open=True)
    budget.close(0, still_open=True)
    assert budget.usage == (0, 0)


@pytest.mark.parametrize(
    "field", ["header_timeout_s", "body_timeout_s", "max_connections", "min_body_rate"]
)
@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True])
def test_connection_limits_must_be_positive_and_finite(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ConnectionLimits(**{field: value})  # type: ignore[arg-type]


def test_the_command_line_sets_the_connection_limits() -> None:
    options = "--header-timeout-s 2.5 --max-header-bytes 16K --min-body-rate 1M"
    args = build_parser().parse_args(
        ["serve", "--simulation", *options.split(), "--max-connections", "50"]
    )
    config = _config(args)
    assert isinstance(config, ServerConfig)
    assert config.connections.header_timeout_s == 2.5
    assert config.connections.max_header_bytes == 16 << 10
    assert config.connections.min_body_rate == 1 << 20
    assert config.connections.max_connections == 50
    # not pinned by the measurement: availability, not what the server accepts
    assert "connections" not in config.security_relevant()
    bad = build_parser().parse_args(["serve", "--simulation", "--max-headers", "0"])
    with pytest.raises(UsageError, match="--max-headers "):
        _config(bad)


# ------------------------------------------------------------- the guard's deadlines
#
# BodyGuard waits for a body's messages with `receive_within`: a message that is already
# there (a body that came with its head) is returned without a timer; one that has to be
# waited for is given up after the deadline, as `asyncio.wait_for` did before. Both are
# checked here against `wait_for` itself, and through the middleware: a body that comes
# after its head, too slowly, is still answered 408 with `Connection: close`.

GRACE_S = 0.2


def _guard(app: ASGIApp, budget: BodyBudget, rate: int = 1 << 20) -> BodyGuard:
    limits = ConnectionLimits(body_timeout_s=GRACE_S, min_body_rate=rate)
    return BodyGuard(
        app,
        limits=limits,
        budget=budget,
        quotas=TenantQuotas(None),
        authenticator=Authenticator(None),
    )


def _scope(length: int) -> Scope:
    headers = [(b"content-length", str(length).encode()), (b"content-type", b"application/json")]
    return {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": headers}


def _paced(chunks: list[tuple[float, bytes, bool]]) -> Receive:
    """An ASGI receive giving each (delay_s, body, more_body) after its delay; 0 is a
    message already there (it came with the head: no wait at all)."""
    pending = list(chunks)

    async def receive() -> Message:
        if not pending:
            await asyncio.sleep(3600)
        delay, body, more = pending.pop(0)
        if delay:
            await asyncio.sleep(delay)
        return {"type": "http.request", "body": body, "more_body": more}

    return receive


async def _reader(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body; answers 200 with it, or 408 when the guard gives up."""
    body = b""
    try:
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        status = 200
    except RequestTimeoutError:
        status, body = 408, b"timeout"
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _serve(chunks: list[tuple[float, bytes, bool]], rate: int = 1 << 20) -> tuple[int, Message]:
    """(status, response head) of `_reader` behind the guard; the budget must be whole
    again afterwards, whatever happened."""
    budget = BodyBudget(max_bodies=4, max_bytes=1 << 20)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    length = sum(len(body) for _, body, _ in chunks)
    asyncio.run(_guard(_reader, budget, rate)(_scope(length), _paced(chunks), send))
    assert budget.usage == (0, 0)
    return int(sent[0]["status"]), sent[0]


def _closes(head: Message) -> bool:
    return (b"connection", b"close") in head["headers"]


def test_a_body_that_came_with_its_head_is_read_without_a_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_timer(delay: float | None) -> object:
        raise AssertionError("a body already there must not arm a timer")

    monkeypatch.setattr(asyncio, "timeout", no_timer)
    status, head = _serve([(0, b"x" * 256, False)])
    assert status == 200 and not _closes(head)


def test_a_body_that_comes_after_its_head_in_time_is_read() -> None:
    status, head = _serve([(0, b"a", True), (GRACE_S / 4, b"b", True), (GRACE_S / 4, b"c", False)])
    assert status == 200 and not _closes(head)


@pytest.mark.parametrize(
    "chunks",
    [
        [(GRACE_S * 3, b"late", False)],  # the whole body after the head, too late
        [(0, b"a", True), (GRACE_S * 3, b"b", False)],  # starts with the head, then stalls
        [(GRACE_S / 2, b"a", True), (GRACE_S * 3, b"b", False)],  # waited for, then stalls
    ],
)
def test_a_body_that_comes_after_its_head_too_slowly_is_refused_408_and_closed(
    chunks: list[tuple[float, bytes, bool]],
) -> None:
    started = time.monotonic()
    status, head = _serve(chunks)
    waited = time.monotonic() - started
    assert (status, _closes(head)) == (408, True)
    assert waited < GRACE_S * 3  # cut at the deadline, not when the late bytes came


def test_a_body_below_the_minimum_rate_after_the_grace_is_refused() -> None:
    # a byte every GRACE_S/2 never stalls for the grace, but 100 bytes/s would be needed
    # after it (each byte buys 10 ms): cut within a few bytes, long before the last one
    chunks = [(GRACE_S / 2, b"x", True)] * 19 + [(GRACE_S / 2, b"x", False)]
    started = time.monotonic()
    status, head = _serve(chunks, rate=100)
    assert (status, _closes(head)) == (408, True)
    assert time.monotonic() - started < GRACE_S * 5


async def _reference(receive: Receive, wait: float) -> Message:
    """What BodyGuard did before: `asyncio.wait_for`."""
    return await asyncio.wait_for(receive(), wait)


@pytest.mark.parametrize("receiver", [receive_within, _reference])
@pytest.mark.parametrize(
    ("delay", "wait", "expected"),
    [(0, 0.2, "message"), (0.02, 0.5, "message"), (0.5, 0.05, "timeout")],
)
def test_receive_within_answers_as_wait_for(
    receiver: Callable[[Receive, float], Awaitable[Message]],
    delay: float,
    wait: float,
    expected: str,
) -> None:
    async def run() -> str:
        receive = _paced([(delay, b"x", False)])
        try:
            message = await receiver(receive, wait)
        except TimeoutError:
            return "timeout"
        assert message == {"type": "http.request", "body": b"x", "more_body": False}
        return "message"

    assert asyncio.run(run()) == expected


def test_receive_within_passes_on_errors_and_cancellation() -> None:
    class Gone(Exception):
        pass

    async def gone_later() -> Message:
        await asyncio.sleep(0.01)
        raise Gone

    cleaned: list[bool] = []

    async def waits_forever() -> Message:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.append(True)
        raise AssertionError("unreachable")

    async def run() -> None:
        with pytest.raises(Gone):
            await receive_within(gone_later, 1.0)
        task = asyncio.ensure_future(receive_within(waits_forever, 3600))
        await asyncio.sleep(0.01)
        task.cancel()  # the request's task cancelled (the client went away)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]
        with pytest.raises(TimeoutError):  # and the timer still cuts a wait short
            await receive_within(waits_forever, 0.01)
        assert cleaned == [True, True]

    asyncio.run(run())
