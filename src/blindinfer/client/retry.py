"""When, and for how long, the client waits before sending a refused request again.

Which answers are retried: only HTTP 429 (`rate_limited`, `too_many_concurrent`) and 503
(`overloaded`: the inference queue is full). The server sends both *before* it does
anything with the request (the rate limit and the concurrency limit are checked when the
request arrives, the queue before the inference is queued), so no request had an effect,
and every request of the client is retried on them:

- `run_model`: the model did not run; running it later gives the same outputs.
- `upload_model`: nothing was stored; and identical uploads are idempotent anyway (the
  same bytes under the same name are the same model).
- `model_metadata`, `list_models`: read only.
- `delete_model`, `share_model`: not applied; both set a state (gone; shared with exactly
  these tenants), so applying them later is the same as applying them now.

Never retried: any other status (a 504 `inference_timeout` means the model did run; 507
`store_full` and 403 `quota_exceeded` do not pass by waiting), and timeouts.

Broken connections (`common.send_retrying_broken`, at most twice more, on a new
connection): a connection that failed while it was being made carried nothing, so any
request is sent again; one that broke later (a replica killed behind a balancer) may have
reached the server, so only idempotent requests are sent again: `run_model`,
`model_metadata`, `list_models`. An upload, delete or share whose connection broke after
it was sent is a `ConnectionFailedError`: the caller may send it again (an identical
upload is the same model; delete and share set a state).

How long: the server's `Retry-After` (seconds or an HTTP date) when it sends one, never
less (earlier would be refused again), plus up to `jitter` of it so that clients told the
same instant do not come back together; a `Retry-After` longer than `max_retry_after` is
not waited for, the error is raised at once. Without `Retry-After`: exponential backoff
`backoff * multiplier ** (attempt - 1)` capped at `max_backoff`, minus up to `jitter` of it.
At most `max_attempts` attempts in all; `NO_RETRY` sends each request once.

Why our own loop and not a library's (issue 13, measured 2026-12-07): httpx's
`HTTPTransport(retries=n)` retries failed connection attempts only, never a status code,
and reads no Retry-After. tenacity 9.2 was tried: the loops of `common.py`
(`send_with_retries`, `asend_with_retries`, `_next_wait`) rewritten on its `Retrying` and
`AsyncRetrying` pass the same 40 tests of tests/unit/test_retry.py, but in 42 lines, as
many as they replace, plus three `type: ignore`s (its `outcome` is optional) and a
dependency; and everything in this module stays: tenacity has no Retry-After (a custom
`wait` must read the header and parse it here), no "give up at once when Retry-After is
longer than `max_retry_after`" (a custom `retry` predicate, computing the same delay as
the wait), and its jitters only add (`wait_exponential_jitter`) or draw from zero
(`wait_random_exponential`), where ours only shortens the backoff and only lengthens a
Retry-After. The idempotency rules are ours either way (which status, which call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({429, 503})
_MAX_DIGITS = 12  # a longer delta-seconds is ~31,700 years: treat it as "too long"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the client retries requests refused with 429 or 503 (see the module docstring)."""

    max_attempts: int = 5
    backoff: float = 0.1
    multiplier: float = 2.0
    max_backoff: float = 5.0
    max_retry_after: float = 30.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (1 = no retries)")
        for name in ("backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def backoff_delay(self, attempt: int, random: float = 0.0) -> float:
        """The wait after failed attempt number `attempt` (1-based) without Retry-After.

        `random` in [0, 1) takes up to `jitter` of the wait off; 0 gives the full schedule.
        """
        exponent = min(attempt - 1, 1023)  # beyond that the cap applies anyway
        base = min(self.max_backoff, self.backoff * self.multiplier**exponent)
        return base * (1.0 - self.jitter * random)

    def delay(
        self,
        attempt: int,
        status: int,
        retry_after: str | None,
        *,
        now: float,
        random: float = 0.0,
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None: raise, do not retry.

        `attempt` is the 1-based number of the attempt that was answered with `status`;
        `retry_after` the raw Retry-After header, if any; `now` Unix seconds (for dates).
        """
        if status not in RETRY_STATUSES or attempt >= self.max_attempts:
            return None
        hinted = parse_retry_after(retry_after, now=now)
        if hinted is None:
            return self.backoff_delay(attempt, random)
        if hinted > self.max_retry_after:
            return None
        return hinted * (1.0 + self.jitter * random)


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Retry-After as seconds from `now`: delta-seconds or an HTTP date (RFC 9110 10.2.3).

    None when absent or malformed (the caller then falls back to its own backoff); a date
    in the past is 0; an absurdly long delay is infinity.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(int(text)) if len(text) <= _MAX_DIGITS else math.inf
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
