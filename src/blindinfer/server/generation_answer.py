"""Answering a generation, whatever API asked for it: the OpenAI-compatible routes
(`routes/openai.py`) and the Open Inference Protocol's generate extension
(`routes/oip_generate.py`) differ only in how they parse a request and render its answer.

What they share, and must keep the same:
- the body bound and the server's token limit (`generation_limits`); a tensor model is
  refused before anything runs (`require_generative`);
- the tenant's concurrency slot is taken and the FIRST event awaited before answering
  200 (`start`): a refusal (context too long, model gone, worker busy, over quota) is still
  an HTTP error, not an event in a stream;
- a whole answer is collected while watching for the client leaving (`whole`): a client
  that goes away stops its generation;
- a stream relays pieces as they come and puts the receipt on its last event (`relay`);
  leaving early (Starlette cancels the generator) closes the events, which cancels the
  generation in the worker; an error after the stream started is its last event;
- every finished generation is signed (`Signed`); a failed or cancelled one is not.

Nothing here logs a prompt, an answer or a model name.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from blindinfer.protocol.generation import (
    FinishReason,
    GenerationLimits,
    ParameterError,
    SamplingParams,
    Usage,
)
from blindinfer.server.body_guard import tenant_slot
from blindinfer.server.disconnect import until_disconnect
from blindinfer.server.errors import status_and_code, where
from blindinfer.server.generation_receipt import sign_generation_receipt
from blindinfer.server.state import ServerState
from blindinfer.store.registry import GenerationEnd, GenerationEvent
from blindinfer.store.sealed import ModelRecord

log = logging.getLogger("blindinfer.server")

MAX_BODY_BYTES = 4 << 20
"""A generative request is JSON text: never more than this, whatever --max-request-bytes."""

Events = AsyncGenerator[GenerationEvent, None]
Receipt = dict[str, str]


def generation_limits(state: ServerState) -> GenerationLimits:
    limits = state.config.limits
    return GenerationLimits(
        max_body_bytes=min(limits.max_request_bytes, MAX_BODY_BYTES),
        max_new_tokens=limits.max_new_tokens,
    )


def require_generative(record: ModelRecord, param: str | None = None) -> ModelRecord:
    if record.kind != "generative":
        raise ParameterError(
            "not_generative",
            "this model is a tensor model: run it with POST /v2/models/{name}/infer",
            param,
        )
    return record


def finish_reason(end: GenerationEnd) -> FinishReason:
    return cast(FinishReason, end.finish_reason if end.finish_reason == "stop" else "length")


@dataclass(frozen=True, slots=True)
class Signed:
    """What a generation's receipt signs besides the answer: the model and the request."""

    state: ServerState
    record: ModelRecord
    request_id: str
    prompt: Mapping[str, object]
    sampling: SamplingParams

    async def sign(self, text: str, end: GenerationEnd) -> Receipt | None:
        """The receipt of a finished generation whose answer, as sent, was `text`; signed on
        a worker thread (a prompt may be megabytes; the first receipt makes the quote)."""
        return await run_in_threadpool(
            lambda: sign_generation_receipt(
                self.state,
                self.record,
                request_id=self.request_id,
                prompt=self.prompt,
                sampling=self.sampling,
                text=text,
                end=end,
            )
        )


async def start(
    request: Request, state: ServerState, tenant: str, events: Events
) -> tuple[GenerationEvent, AsyncExitStack]:
    """The first event, with the stack that holds the tenant's slot and closes `events`."""
    stack = AsyncExitStack()
    try:
        await stack.enter_async_context(tenant_slot(request, state.quotas, tenant))
        stack.push_async_callback(events.aclose)
        first = await anext(events)
    except BaseException:
        await stack.aclose()
        raise
    return first, stack


async def _collect(first: GenerationEvent, events: Events) -> tuple[str, GenerationEnd]:
    pieces: list[str] = []
    event = first
    while not isinstance(event, GenerationEnd):
        pieces.append(event)
        event = await anext(events)
    return "".join(pieces), event


async def whole(
    request: Request,
    first: GenerationEvent,
    events: Events,
    stack: AsyncExitStack,
    signed: Signed,
) -> tuple[str, GenerationEnd, Receipt | None]:
    """The whole answer, its end and its receipt; a client that leaves before it is
    complete stops the generation (`until_disconnect`)."""
    async with stack:
        text, end = await until_disconnect(request, _collect(first, events))
    return text, end, await signed.sign(text, end)


async def relay(
    request: Request,
    first: GenerationEvent,
    events: Events,
    stack: AsyncExitStack,
    signed: Signed,
    *,
    text: Callable[[str], bytes],
    end: Callable[[FinishReason, Usage, Receipt | None], bytes],
    error: Callable[[int, str, str], bytes],
    opening: bytes = b"",
) -> AsyncIterator[bytes]:
    """A stream's events rendered by `text`, `end` (with the receipt) and `error`."""
    async with stack:
        if opening:
            yield opening
        event = first
        pieces: list[str] = []  # the answer as sent: its receipt signs it
        try:
            while not isinstance(event, GenerationEnd):
                pieces.append(event)
                yield text(event)
                event = await anext(events)
            receipt = await signed.sign("".join(pieces), event)
        except Exception as exc:
            status, code, message = status_and_code(exc)
            if status >= 500:
                log.error("a stream failed with %s (%s)", type(exc).__name__, where(request))
            yield error(status, code, message)
            return
        yield end(finish_reason(event), event.usage, receipt)
