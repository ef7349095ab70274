"""The client's retry policy and its loops, with a fake clock and sleep: which answers are
retried, how long it waits (backoff schedule, Retry-After in seconds or as a date), how many
attempts; and that a retried upload streams its body (and its progress) from the start."""

from __future__ import annotations

import asyncio
import math
import os
import pty
import select
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import TextIO

import httpx
import pytest

from blindinfer.cli.progress import ProgressBar
from blindinfer.client.common import (
    UPLOAD_CHUNK,
    Upload,
    asend_with_retries,
    build_request,
    send_with_retries,
    upload_call,
)
from blindinfer.client.retry import NO_RETRY, RETRY_STATUSES, RetryPolicy, parse_retry_after
from blindinfer.errors import ServerError

NOW = 1_750_000_000.0
STEADY = RetryPolicy(jitter=0.0)


# --------------------------------------------------------------------------------------------
# the policy


def test_backoff_schedule_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(backoff=0.1, multiplier=2.0, max_backoff=1.0, jitter=0.0)
    got = [policy.backoff_delay(attempt) for attempt in range(1, 8)]
    assert got == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert policy.backoff_delay(10_000) == 1.0  # no overflow however long it went on


def test_jitter_only_shortens_backoff_and_only_lengthens_retry_after() -> None:
    policy = RetryPolicy(backoff=1.0, jitter=0.25, max_attempts=3)
    assert policy.delay(1, 503, None, now=NOW, random=0.0) == 1.0
    assert policy.delay(1, 503, None, now=NOW, random=0.999) == pytest.approx(0.75, abs=1e-3)
    assert policy.delay(1, 429, "2", now=NOW, random=0.0) == 2.0
    assert policy.delay(1, 429, "2", now=NOW, random=0.999) == pytest.approx(2.5, abs=1e-2)


@pytest.mark.parametrize("status", [429, 503])
def test_refusals_before_any_effect_are_retried(status: int) -> None:
    assert STEADY.delay(1, status, None, now=NOW) == pytest.approx(0.1)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 500, 502, 504, 507])
def test_other_statuses_are_not_retried(status: int) -> None:
    assert status not in RETRY_STATUSES
    assert STEADY.delay(1, status, "1", now=NOW) is None


def test_max_attempts_counts_the_first_attempt() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=0.0)
    assert policy.delay(1, 429, None, now=NOW) is not None
    assert policy.delay(2, 429, None, now=NOW) is not None
    assert policy.delay(3, 429, None, now=NOW) is None
    assert NO_RETRY.delay(1, 503, "1", now=NOW) is None


def test_retry_after_in_seconds_is_honoured_exactly() -> None:
    assert STEADY.delay(1, 429, "3", now=NOW) == 3.0
    assert STEADY.delay(4, 503, " 1 ", now=NOW) == 1.0  # not the backoff of attempt 4


def test_retry_after_as_an_http_date() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 7, UTC), usegmt=True)
    assert parse_retry_after(when, now=NOW) == pytest.approx(7.0)
    assert STEADY.delay(1, 503, when, now=NOW) == pytest.approx(7.0)
    past = format_datetime(datetime.fromtimestamp(NOW - 60, UTC), usegmt=True)
    assert parse_retry_after(past, now=NOW) == 0.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 -0000", now=NOW) == 0.0


@pytest.mark.parametrize("value", ["", "soon", "-1", "1.5", "١٢", "Mon, 99 Foo 2025"])
def test_malformed_retry_after_falls_back_to_backoff(value: str) -> None:
    assert parse_retry_after(value, now=NOW) is None
    assert STEADY.delay(2, 429, value, now=NOW) == pytest.approx(0.2)


def test_a_retry_after_longer_than_the_limit_is_not_waited_for() -> None:
    policy = RetryPolicy(max_retry_after=10.0, jitter=0.0)
    assert policy.delay(1, 429, "10", now=NOW) == 10.0
    assert policy.delay(1, 429, "11", now=NOW) is None
    assert parse_retry_after("9" * 40, now=NOW) == math.inf
    assert policy.delay(1, 429, "9" * 40, now=NOW) is None


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"backoff": -1.0},
        {"max_backoff": math.inf},
        {"max_retry_after": math.nan},
        {"multiplier": 0.5},
        {"jitter": 1.5},
    ],
)
def test_nonsense_policies_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RetryPolicy(**options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the loops


def _answer(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    body = {"error": "slow down", "code": "rate_limited" if status == 429 else "x"}
    return httpx.Response(
        status, headers=headers, json=body, request=httpx.Request("POST", "https://h/v2/x")
    )


def test_retries_until_success_with_the_schedule() -> None:
    answers = [_answer(503), _answer(429, "2"), _answer(503), _answer(200)]
    slept: list[float] = []
    got = send_with_retries(lambda: answers.pop(0), STEADY, slept.append)
    assert got.status_code == 200
    assert slept == pytest.approx([0.1, 2.0, 0.4])


def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    calls: list[int] = []
    slept: list[float] = []

    def send() -> httpx.Response:
        calls.append(1)
        return _answer(429)

    policy = RetryPolicy(max_attempts=4, jitter=0.0)
    with pytest.raises(ServerError) as caught:
        send_with_retries(send, policy, slept.append)
    assert (caught.value.status, caught.value.code) == (429, "rate_limited")
    assert len(calls) == 4
    assert slept == pytest.approx([0.1, 0.2, 0.4])


def test_a_non_retryable_error_is_raised_at_once() -> None:
    slept: list[float] = []
    answers = [_answer(504)]
    with pytest.raises(ServerError) as caught:
        send_with_retries(lambda: answers.pop(0), STEADY, slept.append)
    assert caught.value.status == 504
    assert slept == []


def test_the_async_loop_follows_the_same_policy() -> None:
    answers = [_answer(429, "1"), _answer(503), _answer(200)]
    slept: list[float] = []

    async def send() -> httpx.Response:
        return answers.pop(0)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    got = asyncio.run(asend_with_retries(send, STEADY, sleep))
    assert got.status_code == 200
    assert slept == pytest.approx([1.0, 0.2])


# --------------------------------------------------------------------------------------------
# uploads: streamed in chunks, with progress, re-sent whole on a retry


def test_upload_chunks_and_progress_from_bytes_and_from_a_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * (UPLOAD_CHUNK * 5 // 2 // 256)
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    seen: list[tuple[int, int | None]] = []
    for source in (data, path):
        seen.clear()
        upload = Upload.of(source, lambda done, total: seen.append((done, total)))
        assert b"".join(upload.chunks()) == data
        size = len(data)
        assert seen == [(0, size), (UPLOAD_CHUNK, size), (2 * UPLOAD_CHUNK, size), (size, size)]

        async def collect(u: Upload = upload) -> bytes:
            return b"".join([chunk async for chunk in u.achunks()])

        seen.clear()
        assert asyncio.run(collect()) == data
        assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))


def test_an_upload_refuses_a_file_that_changes_size(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x" * 100)
    upload = Upload.of(path)
    path.write_bytes(b"x" * 50)
    with pytest.raises(OSError, match="shrank"):
        b"".join(upload.chunks())
    path.write_bytes(b"x" * 150)
    with pytest.raises(OSError, match="grew"):
        b"".join(upload.chunks())


def test_a_refused_upload_is_sent_again_whole_with_progress_from_zero() -> None:
    data = b"\x08\x07" * (UPLOAD_CHUNK + 10)
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        assert request.headers["content-length"] == str(len(data))
        assert "transfer-encoding" not in request.headers
        if len(bodies) == 1:
            refusal = {"error": "e", "code": "c"}
            return httpx.Response(429, headers={"retry-after": "1"}, json=refusal)
        return httpx.Response(201, json={"ok": True})

    seen: list[int] = []
    call = upload_call(data, "m", (), lambda done, total: seen.append(done))
    slept: list[float] = []
    with httpx.Client(base_url="https://h", transport=httpx.MockTransport(handler)) as http:
        got = send_with_retries(
            lambda: http.send(build_request(http, call, asynchronous=False)), STEADY, slept.append
        )
    assert got.status_code == 201
    assert bodies == [data, data]
    assert slept == [1.0]
    size = len(data)
    assert seen == [0, UPLOAD_CHUNK, 2 * UPLOAD_CHUNK, size] * 2


def test_cli_progress_bar_lines_when_not_a_terminal() -> None:
    """In a pipe (a CI log): one line per tenth, never a carriage return."""
    read_end, write_end = os.pipe()
    ticks = iter([0.0, 0.0, 1.0, 2.0, 4.0])
    with open(write_end, "w") as pipe:
        bar = ProgressBar("uploading m.onnx", stream=pipe, clock=lambda: next(ticks))
        assert not bar.interactive  # detected
        total = 4 * (1 << 20)
        for done in (0, 1 << 18, 1 << 20, 2 << 20, total):  # 1/16: still the first tenth
            bar(done, total)
        bar.finish()
    with open(read_end) as pipe:
        text = pipe.read()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split("]")[1].split()[0] for line in lines] == ["0%", "25%", "50%", "100%"]
    assert lines[-1].startswith("uploading m.onnx [" + "#" * 30 + "] 100%")
    # tqdm's rate format (two decimals): was "1.0 MiB/s" when the bar was our own
    assert "4.0/4.0 MiB" in lines[-1] and lines[-1].endswith(" 1.00 MiB/s")


def _on_a_terminal(draw: Callable[[TextIO], None]) -> str:
    """What `draw(stream)` shows on a pseudo-terminal (its \r\n turned back into \n)."""
    controller, terminal = pty.openpty()
    try:
        with open(terminal, "w", closefd=False) as stream:
            draw(stream)
        chunks = []
        while select.select([controller], [], [], 0.2)[0]:
            chunks.append(os.read(controller, 1 << 16))
        return b"".join(chunks).decode().replace("\r\n", "\n")
    finally:
        os.close(terminal)
        os.close(controller)


def test_cli_progress_bar_redraws_in_place_on_a_terminal() -> None:
    def complete(stream: TextIO) -> None:
        bar = ProgressBar("up", stream=stream, interval=3600)
        assert bar.interactive  # detected
        for done in (0, 10, 50, 100):  # 10 and 50 within the interval: not drawn
            bar(done, 100)
        bar.finish()

    text = _on_a_terminal(complete)
    assert text.count("\r") == 2 and text.count("\n") == 1
    assert text.split("\r")[-1].startswith("up [" + "#" * 30 + "] 100%  0.0/0.0 MiB")
    assert text.endswith(" MiB/s\n")

    def broken_off(stream: TextIO) -> None:  # an error at half way: the line is ended
        bar = ProgressBar("up", stream=stream, interval=0.0)
        bar(0, 100)
        bar(50, 100)
        bar.finish()
        bar.finish()

    text = _on_a_terminal(broken_off)
    assert text.count("\n") == 1 and text.endswith(" MiB/s\n")
    assert text.split("\r")[-1].startswith("up [" + "#" * 15 + "-" * 15 + "]  50%")

    def sent_again(stream: TextIO) -> None:  # a refused upload is sent again from 0
        bar = ProgressBar("up", stream=stream, interval=3600)
        for done in (0, 100, 0, 100):
            bar(done, 100)
        bar.finish()

    text = _on_a_terminal(sent_again)
    lines = text.split("\n")[:-1]  # not splitlines(): it splits at every \r too
    shown = [line.split("\r")[-1].split("]")[1].split()[0] for line in lines]
    assert shown == ["100%", "100%"]  # two bars, each drawn to its end
