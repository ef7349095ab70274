"""Generation quotas (server/generation_quota.py): the decisions and the settlement, with an
injected clock. The end-to-end proofs are in tests/e2e/test_generation_limits_e2e.py."""

from __future__ import annotations

import contextlib
import threading

import pytest

from blindinfer.protocol.generation import Usage
from blindinfer.runtime.errors import ContextLengthError, WorkerCrashedError
from blindinfer.server.auth import AuthConfig, AuthConfigError
from blindinfer.server.config import Limits
from blindinfer.server.errors import response_headers, status_and_code
from blindinfer.server.generation_quota import (
    CHAT_TEMPLATE_TOKENS,
    CHAT_TOKENS_PER_MESSAGE,
    GenerationDefaults,
    GenerationQuotas,
    KvCacheBusyError,
    KvCacheTooLargeError,
    TokenRateLimitedError,
    TooManyGenerationsError,
    TooManyTokensError,
    prompt_token_bound,
)
from blindinfer.server.metrics import text_of


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def config(*tenants: str) -> AuthConfig:
    text = ""
    for index, tenant in enumerate(tenants):
        name = tenant.split("\n", 1)[0]
        settings = tenant[len(name) :]
        text += f'[[tenant]]\nname = "{name}"{settings}\n'
        text += f'[[tenant.key]]\nid = "k{index}"\nrole = "user"\nsha256 = "{index:064x}"\n'
    return AuthConfig.from_toml(text)


def quotas(*tenants: str, clock: Clock | None = None, **defaults: int) -> GenerationQuotas:
    return GenerationQuotas(
        config(*tenants) if tenants else None,
        GenerationDefaults(**defaults),
        clock=clock or Clock(),
    )


def test_tenant_settings_override_the_server_defaults_and_kv_is_shared_equally() -> None:
    q = quotas(
        "a\ntokens_per_minute = 10\nmax_concurrent_generations = 2\nmax_kv_cache_bytes = 7",
        "b",
        "c",
        tokens_per_minute=100,
        max_concurrent=5,
        kv_cache_budget=300,
    )
    assert (q.limits("a").tokens_per_minute, q.limits("a").max_concurrent) == (10, 2)
    assert q.limits("a").kv_cache_bytes == 7
    assert (q.limits("b").tokens_per_minute, q.limits("b").max_concurrent) == (100, 5)
    assert q.limits("b").kv_cache_bytes == 100  # an equal share of 300
    with pytest.raises(LookupError):
        q.limits("stranger")
    open_mode = quotas(kv_cache_budget=300)
    assert open_mode.limits("local").kv_cache_bytes == 300  # the one user has it all


def test_defaults_come_from_the_server_limits() -> None:
    limits = Limits(max_tokens_per_minute=7, max_concurrent_generations=3)
    assert GenerationDefaults.from_limits(limits) == GenerationDefaults(7, 3, 4 << 30)
    chosen = Limits(kv_cache_budget_bytes=1 << 20)
    assert GenerationDefaults.from_limits(chosen).kv_cache_budget == 1 << 20
    with pytest.raises(ValueError, match="kv_cache_budget_bytes"):
        Limits(kv_cache_budget_bytes=0)


@pytest.mark.parametrize(
    "field", ["tokens_per_minute", "max_concurrent_generations", "max_kv_cache_bytes"]
)
@pytest.mark.parametrize("value", ["0", "-1", "true", "1.5", '"9"'])
def test_tenant_settings_are_checked(field: str, value: str) -> None:
    with pytest.raises(AuthConfigError, match=field):
        config(f"a\n{field} = {value}")


def test_concurrent_generations_until_the_worker_is_done() -> None:
    q = quotas(max_concurrent=2)
    first = q.admit("local", tokens=10, kv_bytes=0)
    q.admit("local", tokens=10, kv_bytes=0)
    with pytest.raises(TooManyGenerationsError) as refused:
        q.admit("local", tokens=10, kv_bytes=0)
    assert status_and_code(refused.value)[:2] == (429, "too_many_generations")
    assert response_headers(refused.value) == {"Retry-After": "1"}
    assert q.running("local") == 2
    first.end(Usage(prompt_tokens=3, completion_tokens=2))
    first.end(Usage(prompt_tokens=3, completion_tokens=2))  # once only
    assert q.running("local") == 1
    q.admit("local", tokens=10, kv_bytes=0)


def test_kv_cache_budget() -> None:
    q = quotas(kv_cache_budget=1000)
    with pytest.raises(KvCacheTooLargeError) as alone:
        q.admit("local", tokens=10, kv_bytes=1001)
    assert status_and_code(alone.value)[:2] == (413, "kv_cache_too_large")
    held = q.admit("local", tokens=10, kv_bytes=600)
    with pytest.raises(KvCacheBusyError) as busy:
        q.admit("local", tokens=10, kv_bytes=401)
    assert status_and_code(busy.value)[:2] == (429, "kv_cache_busy")
    assert response_headers(busy.value) == {"Retry-After": "1"}
    assert q.kv_reserved_by_tenant() == {"local": 600}
    q.admit("local", tokens=10, kv_bytes=400).end(None)
    held.end(asyncio_cancelled())
    assert q.kv_reserved_by_tenant() == {}
    q.admit("local", tokens=10, kv_bytes=1000)


def asyncio_cancelled() -> BaseException:
    import asyncio

    return asyncio.CancelledError()


def test_tokens_per_minute_reserve_then_settle() -> None:
    clock = Clock()
    q = quotas(tokens_per_minute=60, clock=clock)  # one token a second
    with pytest.raises(TooManyTokensError) as whole:
        q.admit("local", tokens=61, kv_bytes=0)
    assert status_and_code(whole.value)[:2] == (413, "too_many_tokens")
    ticket = q.admit("local", tokens=50, kv_bytes=0)  # 10 left
    with pytest.raises(TokenRateLimitedError) as limited:
        q.admit("local", tokens=25, kv_bytes=0)
    assert status_and_code(limited.value)[:2] == (429, "token_rate_limited")
    assert limited.value.retry_after_s == pytest.approx(15.0)
    assert response_headers(limited.value) == {"Retry-After": "15"}
    ticket.end(Usage(prompt_tokens=5, completion_tokens=15))  # used 20 of 50: 30 back
    q.admit("local", tokens=40, kv_bytes=0)  # 40 left exactly
    with pytest.raises(TokenRateLimitedError) as again:
        q.admit("local", tokens=1, kv_bytes=0)
    assert again.value.retry_after_s == pytest.approx(1.0)
    clock.now += 1.0
    q.admit("local", tokens=1, kv_bytes=0)


def test_a_cancelled_generation_pays_for_what_it_used() -> None:
    clock = Clock()
    q = quotas(tokens_per_minute=60, clock=clock)
    q.admit("local", tokens=60, kv_bytes=0).end(Usage(prompt_tokens=4, completion_tokens=6))
    q.admit("local", tokens=50, kv_bytes=0)  # 50 came back, the 10 used did not
    with pytest.raises(TokenRateLimitedError):
        q.admit("local", tokens=1, kv_bytes=0)


def test_refusals_are_refunded_and_crashes_are_charged() -> None:
    clock = Clock()
    q = quotas(tokens_per_minute=60, clock=clock)
    q.admit("local", tokens=60, kv_bytes=0).end(ContextLengthError(needed=99, limit=10))
    q.admit("local", tokens=60, kv_bytes=0).end(None)  # never reached a worker
    q.admit("local", tokens=30, kv_bytes=0).end(WorkerCrashedError("crashed"))
    q.admit("local", tokens=30, kv_bytes=0)
    with pytest.raises(TokenRateLimitedError):
        q.admit("local", tokens=1, kv_bytes=0)


def test_a_refusal_takes_nothing() -> None:
    q = quotas(tokens_per_minute=60, max_concurrent=1, kv_cache_budget=100)
    for _ in range(5):
        with pytest.raises(KvCacheTooLargeError):
            q.admit("local", tokens=60, kv_bytes=101)
    assert q.running_by_tenant() == {}
    q.admit("local", tokens=60, kv_bytes=100)


def test_parallel_admissions_never_overshoot() -> None:
    q = quotas(max_concurrent=3, tokens_per_minute=1000, kv_cache_budget=1 << 30)
    admitted: list[object] = []
    barrier = threading.Barrier(12)

    def one() -> None:
        barrier.wait()
        with contextlib.suppress(TooManyGenerationsError):
            admitted.append(q.admit("local", tokens=1, kv_bytes=1))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 3 and q.running("local") == 3


def test_prompt_token_bound() -> None:
    assert prompt_token_bound({"text": "héllo"}) == 6  # UTF-8 bytes
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    expected = CHAT_TEMPLATE_TOKENS + 2 * CHAT_TOKENS_PER_MESSAGE + len("user") + 2
    assert prompt_token_bound(chat) == expected + len("assistant")


def test_metrics_are_counts_without_labels_of_data() -> None:
    q = quotas()
    q.admit("local", tokens=9, kv_bytes=512)
    q.admit("local", tokens=9, kv_bytes=0).end(Usage(prompt_tokens=3, completion_tokens=4))
    text = text_of(q.metric_families())  # prometheus_client writes values as floats
    assert "blindinfer_generations_running 1.0" in text
    assert "blindinfer_generation_kv_cache_reserved_bytes 512.0" in text
    assert 'blindinfer_generation_tokens_total{kind="completion"} 4.0' in text
    assert "local" not in text


def test_kv_bytes_per_token_of_a_decoder() -> None:
    """Layers x (key, value) x KV heads x head size x fp32; the parse bounds keep it exact."""
    from blindinfer.protocol.genai_config import KV_DTYPE_BYTES, DecoderConfig

    smollm2 = DecoderConfig("model.onnx", num_hidden_layers=30, num_key_value_heads=3, head_size=64)
    assert smollm2.kv_bytes_per_token == 30 * 2 * 3 * 64 * KV_DTYPE_BYTES == 46080
    largest = DecoderConfig(
        "model.onnx", num_hidden_layers=1024, num_key_value_heads=1024, head_size=1024
    )
    assert largest.kv_bytes_per_token == 1 << 33  # the bound the worker's reply is checked against
