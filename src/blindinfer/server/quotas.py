"""Per-tenant quotas: request rate, concurrent inferences, stored models and bytes,
loaded session memory.

Keys stop strangers; quotas stop a tenant, by accident or on purpose, from taking the
server away from the others (the BlindAI audit's memory exhaustion by many uploads, now
per tenant on top of the server-wide `--max-models` / `--max-model-bytes`).

- `TokenBucket`: `burst` requests at once, refilled at `requests_per_second`. Refusal is
  immediate, with the exact wait until the next token (`RateLimitedError.retry_after_s`).
- `ConcurrencyLimiter`: at most `max_concurrent_inferences` running per tenant. A request
  over the limit is refused at once rather than queued: a queue would hold its body in
  memory for as long as the tenant keeps flooding, which is the exhaustion we prevent.
- `memory_limit`: the loaded session bytes charged to a tenant's models before the registry
  evicts the tenant's own models to load another (never another tenant's, when the
  limits add up to no more than the budget; the default is an equal share).
- `generations`: tokens per minute, generations at once and KV-cache memory of
  generative models (`server/generation_quota.py`).
- `check_upload` / `admission`: model count and stored bytes, with the exact numbers in
  the message. `admission` is what uploads use: the registry asks it atomically with
  reserving the upload's room, so that parallel uploads cannot together overshoot.

Everything is guarded by plain `threading.Lock`s held for a few arithmetic operations and
never across an await, so the same objects serve the event loop and worker threads, and
no asyncio primitive gets bound to one loop.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import ClassVar

from blindinfer.server.auth import AccessError, AuthConfig, TenantConfig, TryLaterError
from blindinfer.server.generation_quota import GenerationDefaults, GenerationQuotas

Clock = Callable[[], float]


class RateLimitedError(TryLaterError):
    """The tenant's token bucket is empty. HTTP 429 "rate_limited" with Retry-After."""

    code: ClassVar[str] = "rate_limited"


class TooManyConcurrentError(TryLaterError):
    """The tenant already runs its maximum of concurrent inferences. HTTP 429
    "too_many_concurrent", Retry-After: 1 (when a slot frees is unknowable)."""

    code: ClassVar[str] = "too_many_concurrent"


class QuotaExceededError(AccessError):
    """The upload would take the tenant over its model count or stored bytes.

    HTTP 403 "quota_exceeded", not 507: 507 (our `store_full`) says the *server* ran out,
    which may pass and which an operator should hear about; this is a limit set on this
    tenant, retrying will not help until the tenant deletes models or the operator raises
    it, and clients and proxies treat 5xx as the server's fault (retries, alerts). Nor 429,
    which promises that waiting helps.
    """

    http_status: ClassVar[int] = 403
    code: ClassVar[str] = "quota_exceeded"


class TokenBucket:
    """A thread-safe token bucket; `clock` is injectable (monotonic seconds) for tests."""

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a finite number above 0, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        # A clock that steps back (only an injected one can) must not drain the bucket.
        elapsed = max(0.0, now - self._last)
        self._last = max(self._last, now)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)

    def try_take(self) -> float:
        """Takes a token and returns 0.0, or takes nothing and returns the seconds until
        one will be available."""
        with self._lock:
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate

    def available(self) -> float:
        """Tokens available now (for statistics and tests)."""
        with self._lock:
            self._refill()
            return self._tokens


class TenantQuotas:
    """Every per-tenant limit of one server, created from the auth configuration.

    `TenantQuotas(None)` (open mode) limits nothing: the single local user is bounded by
    the server-wide limits only. With a configuration, a tenant it does not declare gets
    a LookupError: principals come from that same configuration, so this is a bug, and
    failing is safer than running a request unmetered.
    """

    def __init__(
        self,
        config: AuthConfig | None,
        *,
        clock: Clock = time.monotonic,
        memory_budget: int | None = None,
        generation: GenerationDefaults | None = None,
    ) -> None:
        self._tenants: Mapping[str, TenantConfig] | None = (
            None if config is None else {t.name: t for t in config.tenants}
        )
        self._memory_budget = memory_budget
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self._running: dict[str, int] = {}
        # tokens per minute, generations at once, KV cache (server/generation_quota.py)
        self.generations = GenerationQuotas(config, generation or GenerationDefaults(), clock=clock)

    @property
    def enabled(self) -> bool:
        return self._tenants is not None

    def limits(self, tenant: str) -> TenantConfig | None:
        """The tenant's limits; None in open mode."""
        if self._tenants is None:
            return None
        try:
            return self._tenants[tenant]
        except KeyError:
            raise LookupError(f"tenant {tenant!r} is not in the configuration") from None

    # ---- memory

    def memory_limit(self, tenant: str) -> int | None:
        """The most loaded-session bytes the registry charges to `tenant` before it
        evicts the tenant's own models (`ModelRegistry(tenant_memory=...)`).

        `max_loaded_bytes` when the tenant sets it, else an equal share of the server's
        memory budget: with shares that add up to no more than the budget, no tenant's
        loads can ever evict another tenant's model. None in open mode (one user) or
        without a budget. A tenant the configuration no longer declares (its models
        restored from disk) gets the equal share too.
        """
        if self._tenants is None:
            return None
        limits = self._tenants.get(tenant)
        if limits is not None and limits.max_loaded_bytes is not None:
            return limits.max_loaded_bytes
        if self._memory_budget is None:
            return None
        return self._memory_budget // max(1, len(self._tenants))

    # ---- rate

    def check_rate(self, tenant: str) -> None:
        """Counts one request against the tenant's bucket; RateLimitedError when empty."""
        limits = self.limits(tenant)
        if limits is None:
            return
        with self._lock:
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = TokenBucket(limits.requests_per_second, limits.burst, clock=self._clock)
                self._buckets[tenant] = bucket
        wait = bucket.try_take()
        if wait > 0:
            raise RateLimitedError(
                f"tenant {tenant!r} is over its rate of {limits.requests_per_second:g} "
                f"requests per second (burst {limits.burst}); retry in {wait:.3f} s",
                wait,
            )

    # ---- concurrency

    @asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        """Holds one of the tenant's inference slots for the duration of the block.

        Acquisition is synchronous and immediately followed by the try, so a cancellation
        can never leak a slot.
        """
        self._acquire(tenant)
        try:
            yield
        finally:
            self._release(tenant)

    def running(self, tenant: str) -> int:
        """Inferences the tenant is running now."""
        with self._lock:
            return self._running.get(tenant, 0)

    def _acquire(self, tenant: str) -> None:
        limits = self.limits(tenant)
        with self._lock:
            running = self._running.get(tenant, 0)
            if limits is not None and running >= limits.max_concurrent_inferences:
                raise TooManyConcurrentError(
                    f"tenant {tenant!r} already runs {running} inferences, its maximum of "
                    f"{limits.max_concurrent_inferences} at a time; retry when one finishes"
                )
            self._running[tenant] = running + 1

    def _release(self, tenant: str) -> None:
        with self._lock:
            remaining = self._running[tenant] - 1
            if remaining:
                self._running[tenant] = remaining
            else:
                del self._running[tenant]

    # ---- storage

    def check_upload(
        self,
        tenant: str,
        current_models: int,
        current_bytes: int,
        new_bytes: int,
        *,
        replacing_bytes: int | None = None,
    ) -> None:
        """Raises QuotaExceededError if storing `new_bytes` more would exceed the tenant's
        model count or stored bytes. See `check_upload_against`."""
        limits = self.limits(tenant)
        if limits is not None:
            check_upload_against(
                limits, current_models, current_bytes, new_bytes, replacing_bytes=replacing_bytes
            )

    def admission(self, tenant: str) -> Callable[[int, int, int], None] | None:
        """The tenant's storage quota as the registry asks it, under its lock, with the
        room of uploads in flight reserved (`ModelRegistry.add(admit=...)`): the check
        and the reservation are one step, so parallel uploads cannot overshoot it. None
        in open mode."""
        limits = self.limits(tenant)
        if limits is None:
            return None
        checked = limits

        def admit(current_models: int, current_bytes: int, new_bytes: int) -> None:
            check_upload_against(checked, current_models, current_bytes, new_bytes)

        return admit


def check_upload_against(
    limits: TenantConfig,
    current_models: int,
    current_bytes: int,
    new_bytes: int,
    *,
    replacing_bytes: int | None = None,
) -> None:
    """The storage decision alone. `current_*` are what the tenant holds now. A new model
    adds one model and `new_bytes`; replacing one of `replacing_bytes` keeps the count and
    changes the bytes by the difference, so a tenant at its quota may still update a model
    to one no larger."""
    for name, value in (
        ("current_models", current_models),
        ("current_bytes", current_bytes),
        ("new_bytes", new_bytes),
        ("replacing_bytes", replacing_bytes or 0),
    ):
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
    tenant = limits.name
    if replacing_bytes is None and current_models + 1 > limits.max_models:
        raise QuotaExceededError(
            f"tenant {tenant!r} has {current_models} models and may store at most "
            f"{limits.max_models}; delete one before uploading another"
        )
    after = current_bytes - (replacing_bytes or 0) + new_bytes
    if after > limits.max_stored_bytes:
        raise QuotaExceededError(
            f"tenant {tenant!r} stores {current_bytes} bytes; this upload of {new_bytes} bytes"
            + (f" replacing {replacing_bytes} bytes" if replacing_bytes is not None else "")
            + f" would bring it to {after} bytes, over its quota of {limits.max_stored_bytes}"
            " bytes"
        )
