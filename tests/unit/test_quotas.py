"""Per-tenant quotas: token buckets on a fake clock (exact allowances and waits), the
concurrency limiter under asyncio (immediate refusal, release on error and cancellation),
and the storage checks with their exact numbers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from blindinfer.server.auth import AccessError, ApiKey, AuthConfig, Role, TenantConfig
from blindinfer.server.quotas import (
    QuotaExceededError,
    RateLimitedError,
    TenantQuotas,
    TokenBucket,
    TooManyConcurrentError,
    check_upload_against,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _config(**a_settings: float) -> AuthConfig:
    return AuthConfig(
        (TenantConfig("a", **a_settings), TenantConfig("b")),  # type: ignore[arg-type]
        (ApiKey("ka", "a", Role.OWNER, SHA_A), ApiKey("kb", "b", Role.OWNER, SHA_B)),
    )


# --------------------------------------------------------------------------- bucket


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take() == 0.5  # one token takes 1/rate seconds
    assert bucket.try_take() == 0.5  # a refusal takes nothing
    clock.advance(0.25)
    assert bucket.try_take() == 0.25
    clock.advance(0.25)
    assert bucket.try_take() == 0.0
    assert bucket.try_take() == 0.5
    clock.advance(1.25)  # 2.5 tokens
    assert bucket.available() == 2.5
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.25]


def test_bucket_never_holds_more_than_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    clock.advance(3600)
    assert bucket.available() == 3.0
    assert [bucket.try_take() for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


def test_bucket_survives_a_clock_stepping_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1.0, 1, clock=clock)
    assert bucket.try_take() == 0.0
    clock.advance(-50)
    assert bucket.try_take() == 1.0  # neither refilled nor drained below zero
    clock.advance(50.5)  # back to where it was, plus half a second
    assert bucket.try_take() == 0.5


def test_bucket_fractional_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(0.25, 1, clock=clock)
    assert bucket.try_take() == 0.0
    assert bucket.try_take() == 4.0
    clock.advance(0.5)
    assert bucket.try_take() == 3.5


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("inf"), 1), (1.0, 0)])
def test_bucket_refuses_bad_parameters(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, burst)


def test_bucket_is_thread_safe() -> None:
    bucket = TokenBucket(1.0, 100, clock=FakeClock())  # frozen clock: exactly 100 tokens
    granted = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        granted.append(sum(bucket.try_take() == 0.0 for _ in range(500)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 100


# --------------------------------------------------------------------------- rate


def test_tenant_rate_limit_is_per_tenant_with_retry_after() -> None:
    clock = FakeClock()
    quotas = TenantQuotas(_config(requests_per_second=0.25, burst=2), clock=clock)
    quotas.check_rate("a")
    quotas.check_rate("a")
    with pytest.raises(RateLimitedError) as info:
        quotas.check_rate("a")
    error = info.value
    assert error.retry_after_s == 4.0
    assert error.http_status == 429
    assert error.code == "rate_limited"
    assert error.headers == {"Retry-After": "4"}
    assert "tenant 'a' is over its rate of 0.25 requests per second (burst 2)" in str(error)
    assert "retry in 4.000 s" in str(error)
    for _ in range(20):  # b has its own bucket (default burst 20)
        quotas.check_rate("b")
    clock.advance(0.5)
    with pytest.raises(RateLimitedError) as info:
        quotas.check_rate("a")
    assert info.value.retry_after_s == 3.5
    assert info.value.headers == {"Retry-After": "4"}  # rounded up
    clock.advance(3.5)
    quotas.check_rate("a")


def test_retry_after_header_is_at_least_one_second() -> None:
    assert RateLimitedError("x", 0.001).headers == {"Retry-After": "1"}
    assert RateLimitedError("x", 1.0).headers == {"Retry-After": "1"}
    assert RateLimitedError("x", 1.01).headers == {"Retry-After": "2"}


def test_open_mode_limits_nothing() -> None:
    quotas = TenantQuotas(None, clock=FakeClock())
    assert quotas.enabled is False
    assert quotas.limits("local") is None
    for _ in range(10_000):
        quotas.check_rate("local")
    quotas.check_upload("local", 10**6, 10**15, 10**12)


def test_unknown_tenant_is_a_bug_not_a_free_pass() -> None:
    quotas = TenantQuotas(_config())
    with pytest.raises(LookupError, match="'ghost' is not in the configuration"):
        quotas.check_rate("ghost")
    with pytest.raises(LookupError):
        quotas.check_upload("ghost", 0, 0, 1)


# --------------------------------------------------------------------------- concurrency


def test_concurrency_limit_refuses_at_once_and_releases() -> None:
    quotas = TenantQuotas(_config(max_concurrent_inferences=2))

    async def scenario() -> None:
        release = asyncio.Event()
        entered = 0

        async def hold() -> None:
            nonlocal entered
            async with quotas.slot("a"):
                entered += 1
                await release.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(2)]
        while entered < 2:
            await asyncio.sleep(0)
        assert quotas.running("a") == 2
        with pytest.raises(TooManyConcurrentError) as info:
            async with quotas.slot("a"):
                raise AssertionError("a third slot was granted")
        assert info.value.http_status == 429
        assert info.value.code == "too_many_concurrent"
        assert info.value.headers == {"Retry-After": "1"}
        assert "already runs 2 inferences, its maximum of 2" in str(info.value)
        async with quotas.slot("b"):  # another tenant is not affected
            assert quotas.running("b") == 1
        release.set()
        await asyncio.gather(*tasks)
        assert quotas.running("a") == 0
        async with quotas.slot("a"), quotas.slot("a"):
            assert quotas.running("a") == 2

    asyncio.run(scenario())


def test_slot_is_released_on_error_and_on_cancellation() -> None:
    quotas = TenantQuotas(_config(max_concurrent_inferences=1))

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="inference failed"):
            async with quotas.slot("a"):
                raise RuntimeError("inference failed")
        assert quotas.running("a") == 0

        started = asyncio.Event()

        async def hold_forever() -> None:
            async with quotas.slot("a"):
                started.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(hold_forever())
        await started.wait()
        assert quotas.running("a") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert quotas.running("a") == 0

    asyncio.run(scenario())


def test_open_mode_counts_but_never_refuses_slots() -> None:
    quotas = TenantQuotas(None)

    async def scenario() -> None:
        async with quotas.slot("local"), quotas.slot("local"), quotas.slot("local"):
            assert quotas.running("local") == 3
        assert quotas.running("local") == 0

    asyncio.run(scenario())


# --------------------------------------------------------------------------- storage


def test_model_count_quota() -> None:
    quotas = TenantQuotas(_config(max_models=3, max_stored_bytes=1000))
    quotas.check_upload("a", 2, 0, 10)
    with pytest.raises(QuotaExceededError) as info:
        quotas.check_upload("a", 3, 0, 10)
    assert str(info.value) == (
        "tenant 'a' has 3 models and may store at most 3; delete one before uploading another"
    )
    assert info.value.http_status == 403
    assert info.value.code == "quota_exceeded"
    assert info.value.headers == {}
    # replacing keeps the count: allowed at the limit
    quotas.check_upload("a", 3, 500, 10, replacing_bytes=400)


def test_stored_bytes_quota_exact_numbers() -> None:
    quotas = TenantQuotas(_config(max_models=10, max_stored_bytes=1000))
    quotas.check_upload("a", 1, 600, 400)  # exactly at the quota is fine
    with pytest.raises(QuotaExceededError) as info:
        quotas.check_upload("a", 1, 600, 401)
    assert str(info.value) == (
        "tenant 'a' stores 600 bytes; this upload of 401 bytes would bring it to 1001 bytes, "
        "over its quota of 1000 bytes"
    )
    quotas.check_upload("a", 1, 900, 500, replacing_bytes=400)
    with pytest.raises(QuotaExceededError) as info:
        quotas.check_upload("a", 1, 900, 501, replacing_bytes=400)
    assert str(info.value) == (
        "tenant 'a' stores 900 bytes; this upload of 501 bytes replacing 400 bytes would bring "
        "it to 1001 bytes, over its quota of 1000 bytes"
    )


def test_zero_quota_tenant_can_store_nothing() -> None:
    limits = TenantConfig("consumer", max_models=0, max_stored_bytes=0)
    with pytest.raises(QuotaExceededError, match="may store at most 0"):
        check_upload_against(limits, 0, 0, 0)


@pytest.mark.parametrize(
    ("args", "replacing"),
    [((-1, 0, 0), None), ((0, -1, 0), None), ((0, 0, -1), None), ((0, 0, 0), -1)],
)
def test_negative_numbers_are_a_bug(args: tuple[int, int, int], replacing: int | None) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        check_upload_against(TenantConfig("t"), *args, replacing_bytes=replacing)


def test_quota_errors_are_access_errors() -> None:
    for kind in (RateLimitedError, TooManyConcurrentError, QuotaExceededError):
        assert issubclass(kind, AccessError)


# ---- loaded memory per tenant (issue 21, item 8)


def _tenants(*tenants: TenantConfig) -> AuthConfig:
    keys = tuple(
        ApiKey(f"k-{t.name}", t.name, Role.OWNER, f"{i:064x}") for i, t in enumerate(tenants)
    )
    return AuthConfig(tenants, keys)


def test_memory_limit_is_the_tenants_own_or_an_equal_share() -> None:
    config = _tenants(TenantConfig("a", max_loaded_bytes=100), TenantConfig("b"), TenantConfig("c"))
    quotas = TenantQuotas(config, memory_budget=900)
    assert quotas.memory_limit("a") == 100
    assert quotas.memory_limit("b") == quotas.memory_limit("c") == 300
    assert quotas.memory_limit("gone") == 300  # restored models of a removed tenant
    assert TenantQuotas(config).memory_limit("b") is None  # no budget given
    assert TenantQuotas(None, memory_budget=900).memory_limit("local") is None  # open mode


def test_admission_is_the_storage_quota_and_none_in_open_mode() -> None:
    quotas = TenantQuotas(_tenants(TenantConfig("a", max_models=2, max_stored_bytes=100)))
    admit = quotas.admission("a")
    assert admit is not None
    admit(1, 50, 50)
    with pytest.raises(QuotaExceededError, match="at most 2"):
        admit(2, 0, 1)
    with pytest.raises(QuotaExceededError, match="over its quota of 100 bytes"):
        admit(0, 60, 41)
    assert TenantQuotas(None).admission("local") is None
