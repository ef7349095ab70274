"""Per-tenant limits of generation: tokens per minute, generations at once, KV-cache memory.

A generation costs what a single inference never did: it holds a worker and a KV cache for
as long as it runs, and its price grows with the tokens it reads and writes. So on top of
the request rate and concurrency slots of `quotas.py`, every generation is admitted here,
in one step under one lock (parallel requests cannot together overshoot):

- **Generations at once** (`max_concurrent_generations`, default
  `--max-concurrent-generations`): past it, 429 "too_many_generations", Retry-After: 1. A
  generation counts until its *worker* is done with it, not until its HTTP answer ends: a
  client that goes away frees its count when the worker has actually stopped (the cancel
  reaches it between two tokens), so the count is what really runs.
- **KV cache** (`max_kv_cache_bytes`, default an equal share of `--kv-cache-budget-bytes`,
  itself `--memory-budget-bytes` unless set): each generation reserves (prompt tokens +
  max_tokens) x the model's KV bytes per token (`DecoderConfig.kv_bytes_per_token`, from
  its parsed genai_config, as the worker reported it at load), capped at the model's
  context: onnxruntime-genai allocates the cache for prompt + max_tokens up front. One
  request larger than the tenant's whole budget is 413 "kv_cache_too_large" (waiting will
  not help: lower max_tokens or the prompt); one that does not fit beside the tenant's
  generations in flight is 429 "kv_cache_busy", Retry-After: 1. Released when the
  worker is done.
- **Tokens per minute** (`tokens_per_minute`, default `--max-tokens-per-minute`): prompt +
  completion tokens, in a token bucket that holds a minute's worth and refills
  continuously. A generation *reserves* prompt + max_tokens up front, so a request that
  cannot fit is refused before any work (429 "token_rate_limited", with the exact
  Retry-After; 413 "too_many_tokens" if it exceeds the whole minute's quota), and is
  *settled at the end* on the worker's own counts: what it did not use goes back, and a
  cancelled generation pays for the tokens it read and wrote before it stopped. Why not
  charge tokens as they come: the server sees text pieces, not tokens (a piece may hold
  several, a held-back stop string none), the worker's final count is exact, and the
  reservation already stops a tenant from starting what it cannot pay for. A generation
  refused before it ran (context too long, worker queue full) is refunded whole; one that
  crashed or timed out keeps its reservation charged (its real use is unknown).

The prompt's token count is known only in the worker (tokenizing an untrusted tokenizer
belongs there), so admission uses a bound: one token per UTF-8 byte of the text (a
byte-level BPE never needs more; SentencePiece-style tokenizers with byte fallback neither)
plus, for chat, CHAT_TOKENS_PER_MESSAGE for each message's role markers and
CHAT_TEMPLATE_TOKENS for the template's own text (a default system prompt). The settlement
corrects the token bucket to the exact count.

Open mode (no tenants) applies the server's defaults to its one user. Nothing here sees a
prompt or an answer beyond their lengths; metrics are server-wide counts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from blindinfer.errors import ProtocolError
from blindinfer.protocol.generation import SamplingParams, Usage
from blindinfer.runtime.errors import GenerationRequestError, InvalidTensorError, OverloadedError
from blindinfer.server.auth import AccessError, AuthConfig, TenantConfig, TryLaterError

if TYPE_CHECKING:
    from blindinfer.server.config import Limits
    from blindinfer.server.state import ServerState
    from blindinfer.store.registry import GenerationEvent, GenerationOutcome
    from blindinfer.store.sealed import ModelRecord

Clock = Callable[[], float]

CHAT_TOKENS_PER_MESSAGE: Final = 16
"""Role markers of one chat message (`<|im_start|>user\\n ... <|im_end|>\\n` is 5 tokens)."""
CHAT_TEMPLATE_TOKENS: Final = 128
"""The chat template's own text: the generation prompt and a default system prompt."""


class TooManyGenerationsError(TryLaterError):
    """The tenant already runs its maximum of generations. 429, Retry-After: 1."""

    code: ClassVar[str] = "too_many_generations"


class KvCacheBusyError(TryLaterError):
    """The tenant's generations in flight hold its KV budget. 429, Retry-After: 1."""

    code: ClassVar[str] = "kv_cache_busy"


class KvCacheTooLargeError(AccessError):
    """One generation needs more KV cache than the tenant's whole budget. 413."""

    http_status: ClassVar[int] = 413
    code: ClassVar[str] = "kv_cache_too_large"


class TokenRateLimitedError(TryLaterError):
    """The tenant's tokens per minute cannot pay for this generation now. 429 with the
    exact Retry-After (whole seconds, rounded up, at least 1)."""

    code: ClassVar[str] = "token_rate_limited"


class TooManyTokensError(AccessError):
    """One generation asks for more tokens than the tenant may use in a whole minute. 413."""

    http_status: ClassVar[int] = 413
    code: ClassVar[str] = "too_many_tokens"


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The server's settings: per-tenant defaults and the KV budget the tenants share."""

    tokens_per_minute: int = 200_000
    max_concurrent: int = 16
    kv_cache_budget: int = 4 << 30

    @classmethod
    def from_limits(cls, limits: Limits) -> GenerationDefaults:
        budget = limits.kv_cache_budget_bytes
        return cls(
            tokens_per_minute=limits.max_tokens_per_minute,
            max_concurrent=limits.max_concurrent_generations,
            kv_cache_budget=limits.memory_budget_bytes if budget is None else budget,
        )


@dataclass(frozen=True, slots=True)
class TenantGenerationLimits:
    tokens_per_minute: int
    max_concurrent: int
    kv_cache_bytes: int


@dataclass(slots=True)
class _Use:
    """One tenant's generations now: count, KV reserved, token bucket level and time."""

    level: float
    last: float
    running: int = 0
    kv_reserved: int = 0


def prompt_token_bound(prompt: Mapping[str, object]) -> int:
    """At most how many tokens the prompt will be (module docstring): `{"text": str}` or
    `{"messages": [{"role", "content"}, ...]}`, as the routes hand them to the registry."""
    text = prompt.get("text")
    if isinstance(text, str):
        return len(text.encode("utf-8", "surrogatepass"))
    total = CHAT_TEMPLATE_TOKENS
    messages = prompt.get("messages")
    for message in messages if isinstance(messages, list | tuple) else ():
        total += CHAT_TOKENS_PER_MESSAGE
        if isinstance(message, Mapping):
            for value in message.values():
                total += len(str(value).encode("utf-8", "surrogatepass"))
    return total


class GenerationTicket:
    """One admitted generation: what it reserved, given back once by `end`."""

    def __init__(self, quotas: GenerationQuotas, tenant: str, tokens: int, kv_bytes: int) -> None:
        self.tenant = tenant
        self.tokens = tokens
        self.kv_bytes = kv_bytes
        self._quotas = quotas
        self._ended = False
        self._lock = threading.Lock()

    def end(self, outcome: GenerationOutcome) -> None:
        """The worker is done (`ModelRegistry.generate_async(on_end=...)`, any thread);
        idempotent."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._quotas._settle(self, outcome)


class GenerationQuotas:
    """The generation limits of every tenant of one server (module docstring)."""

    def __init__(
        self,
        config: AuthConfig | None,
        defaults: GenerationDefaults,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self._tenants: Mapping[str, TenantConfig] | None = (
            None if config is None else {t.name: t for t in config.tenants}
        )
        self.defaults = defaults
        self._clock = clock
        self._lock = threading.Lock()
        self._use: dict[str, _Use] = {}
        self._counted = {"prompt": 0, "completion": 0}

    def limits(self, tenant: str) -> TenantGenerationLimits:
        """The tenant's limits: its own where its entry sets them, else the defaults."""
        defaults = self.defaults
        if self._tenants is None:
            return TenantGenerationLimits(
                defaults.tokens_per_minute, defaults.max_concurrent, defaults.kv_cache_budget
            )
        try:
            config = self._tenants[tenant]
        except KeyError:
            raise LookupError(f"tenant {tenant!r} is not in the configuration") from None
        share = defaults.kv_cache_budget // max(1, len(self._tenants))
        return TenantGenerationLimits(
            tokens_per_minute=config.tokens_per_minute or defaults.tokens_per_minute,
            max_concurrent=config.max_concurrent_generations or defaults.max_concurrent,
            kv_cache_bytes=config.max_kv_cache_bytes or max(1, share),
        )

    def _refilled(self, tenant: str, limits: TenantGenerationLimits) -> _Use:
        """The tenant's use, its bucket refilled to now (call with the lock held)."""
        now = self._clock()
        use = self._use.get(tenant)
        if use is None:
            use = self._use[tenant] = _Use(level=float(limits.tokens_per_minute), last=now)
        rate = limits.tokens_per_minute / 60.0
        use.level = min(
            float(limits.tokens_per_minute), use.level + max(0.0, now - use.last) * rate
        )
        use.last = max(use.last, now)
        return use

    def admit(self, tenant: str, *, tokens: int, kv_bytes: int) -> GenerationTicket:
        """Reserves one generation of at most `tokens` tokens holding `kv_bytes` of KV
        cache, or refuses it (module docstring) taking nothing."""
        limits = self.limits(tenant)
        with self._lock:
            use = self._refilled(tenant, limits)
            if use.running >= limits.max_concurrent:
                raise TooManyGenerationsError(
                    f"tenant {tenant!r} already runs {use.running} generations, its maximum "
                    f"of {limits.max_concurrent} at a time; retry when one finishes"
                )
            if kv_bytes > limits.kv_cache_bytes:
                raise KvCacheTooLargeError(
                    f"this generation needs {kv_bytes} bytes of KV cache ({tokens} tokens of "
                    f"prompt and max_tokens); tenant {tenant!r} may hold at most "
                    f"{limits.kv_cache_bytes}: lower max_tokens or shorten the prompt"
                )
            if use.kv_reserved + kv_bytes > limits.kv_cache_bytes:
                raise KvCacheBusyError(
                    f"tenant {tenant!r}'s generations in flight hold {use.kv_reserved} of its "
                    f"{limits.kv_cache_bytes} bytes of KV cache; this one needs {kv_bytes}: "
                    "retry when one finishes"
                )
            if tokens > limits.tokens_per_minute:
                raise TooManyTokensError(
                    f"this generation may take {tokens} tokens (prompt and max_tokens); tenant "
                    f"{tenant!r} may use {limits.tokens_per_minute} a minute: lower max_tokens"
                )
            if use.level < tokens:
                wait = (tokens - use.level) / (limits.tokens_per_minute / 60.0)
                raise TokenRateLimitedError(
                    f"tenant {tenant!r} is over its {limits.tokens_per_minute} tokens per "
                    f"minute: this generation may take {tokens}; retry in {wait:.1f} s",
                    wait,
                )
            use.level -= tokens
            use.running += 1
            use.kv_reserved += kv_bytes
        return GenerationTicket(self, tenant, tokens, kv_bytes)

    def _settle(self, ticket: GenerationTicket, outcome: GenerationOutcome) -> None:
        limits = self.limits(ticket.tenant)
        with self._lock:
            use = self._refilled(ticket.tenant, limits)
            use.running -= 1
            use.kv_reserved -= ticket.kv_bytes
            if isinstance(outcome, Usage):
                used = outcome.prompt_tokens + outcome.completion_tokens
                self._counted["prompt"] += outcome.prompt_tokens
                self._counted["completion"] += outcome.completion_tokens
            elif outcome is None or isinstance(
                outcome, InvalidTensorError | ProtocolError | OverloadedError
            ):
                used = 0  # refused before generating: nothing was read or written
            else:
                used = ticket.tokens  # crashed or timed out: its real use is unknown
            # the unused part of the reservation goes back; a worker that counted more
            # than the bound (an unusual tokenizer) leaves the bucket in debt
            use.level = min(float(limits.tokens_per_minute), use.level + ticket.tokens - used)
            if not use.running and use.level >= limits.tokens_per_minute:
                del self._use[ticket.tenant]  # back to a full bucket: nothing to remember

    # ---- observation (admin stats, /metrics): counts and bytes only

    def running(self, tenant: str) -> int:
        with self._lock:
            use = self._use.get(tenant)
            return 0 if use is None else use.running

    def running_by_tenant(self) -> dict[str, int]:
        with self._lock:
            return {t: u.running for t, u in sorted(self._use.items()) if u.running}

    def kv_reserved_by_tenant(self) -> dict[str, int]:
        with self._lock:
            return {t: u.kv_reserved for t, u in sorted(self._use.items()) if u.kv_reserved}

    def metric_families(self) -> list[Metric]:
        """Prometheus families: server-wide, no tenant or model labels."""
        with self._lock:
            running = sum(u.running for u in self._use.values())
            kv = sum(u.kv_reserved for u in self._use.values())
            counted = dict(self._counted)
        tokens = CounterMetricFamily(
            "blindinfer_generation_tokens_total",
            "Tokens read (prompt) and written (completion) by ended generations, "
            "cancelled ones included, as their workers counted them.",
            labels=["kind"],
        )
        for kind, n in counted.items():
            tokens.add_metric([kind], float(n))
        return [
            GaugeMetricFamily(
                "blindinfer_generations_running",
                "Generations admitted and not yet ended in their worker.",
                value=float(running),
            ),
            GaugeMetricFamily(
                "blindinfer_generation_kv_cache_reserved_bytes",
                "KV cache reserved by the generations running now.",
                value=float(kv),
            ),
            tokens,
        ]


async def generate(
    state: ServerState,
    tenant: str,
    record: ModelRecord,
    prompt: Mapping[str, object],
    params: SamplingParams,
) -> AsyncGenerator[GenerationEvent, None]:
    """`ModelRegistry.generate_async` within the tenant's generation limits: the events of
    one admitted generation. Admission happens at the first `anext` (so a refusal is still
    an HTTP error, before any answer starts); what it reserved is given back when the
    worker is done with the generation, whenever the consumer stopped iterating."""
    if record.kind != "generative":
        raise GenerationRequestError(
            "not_generative", "this model is a tensor model: use /v2/models/{name}/infer"
        )
    context, kv_per_token = await state.registry.generation_shape(record)
    tokens = min(context, prompt_token_bound(prompt) + params.max_tokens)
    ticket = state.quotas.generations.admit(tenant, tokens=tokens, kv_bytes=tokens * kv_per_token)
    events = state.registry.generate_async(record, prompt, params, on_end=ticket.end)
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()
