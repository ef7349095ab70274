"""The OpenAI-compatible API for generative models, on the same attested TLS port.

- `GET /v1/models`: the generative models the caller may run (OpenAI's list shape; `id` is
  the model's name).
- `POST /v1/chat/completions` and `POST /v1/completions`: parsed once by
  `blindinfer.protocol.openai_requests` (unsupported parameters refused, never ignored),
  generated in the model's worker (`ModelRegistry.generate_async`: no server thread held),
  answered whole or, with `stream: true`, as server-sent events ending in `data: [DONE]`.

Same API keys (`Authorization: Bearer`, what the `openai` SDK sends), tenants, visibility
and concurrency slots as the Open Inference Protocol routes. Every error has OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) with blindinfer's machine-readable code:
the status and code come from the server's one mapping (`server.errors.status_and_code`).
An error after a stream has started is sent as an error event, then `[DONE]`. A client that
goes away mid-stream, or before its whole answer (`server.disconnect`), cancels its
generation (the worker stops between two tokens). Every generation is admitted within its
tenant's tokens per minute, generations at once and KV-cache budget
(`server.generation_quota.generate`).

Every finished completion carries its signed receipt (`server.generation_receipt`, always,
no opt-in) as a top-level `"receipt"`: on the whole object, or on the stream's last chunk
before `[DONE]`. A failed or cancelled generation has none.

Nothing here logs a prompt, an answer or a model name.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import cast

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from blindinfer.protocol import sse
from blindinfer.protocol.generation import (
    FinishReason,
    GenerationLimits,
    ParameterError,
    SamplingParams,
)
from blindinfer.protocol.openai_requests import (
    parse_chat_completion_request,
    parse_completion_request,
)
from blindinfer.protocol.openai_responses import (
    ChatCompletionStream,
    CompletionStream,
    chat_completion,
    error_body,
    error_event,
    new_id,
    now,
    text_completion,
)
from blindinfer.server.auth import Action, Principal, authorize, sharing_view, visible_to
from blindinfer.server.bodies import read_bounded
from blindinfer.server.body_guard import tenant_slot
from blindinfer.server.disconnect import until_disconnect
from blindinfer.server.errors import response_headers, status_and_code, where
from blindinfer.server.generation_quota import generate
from blindinfer.server.generation_receipt import generation_receipt
from blindinfer.server.respond import json_response as _json
from blindinfer.server.respond import server_state as _state
from blindinfer.server.state import ServerState
from blindinfer.store.registry import GenerationEnd, GenerationEvent
from blindinfer.store.sealed import ModelRecord

log = logging.getLogger("blindinfer.server")

MAX_BODY_BYTES = 4 << 20
"""A generative request is JSON text: never more than this, whatever --max-request-bytes."""

Handler = Callable[[Request], Awaitable[Response]]


def _openai_errors(handler: Handler) -> Handler:
    """Answers every failure of `handler` in OpenAI's error shape, with our status and code."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            return _error_response(request, exc)

    return wrapped


def _error_response(request: Request, exc: BaseException) -> Response:
    status, code, message = status_and_code(exc)
    if status >= 500:
        log.error("request failed with %s (%s)", type(exc).__name__, where(request))
    param = exc.param if isinstance(exc, ParameterError) else None
    return Response(
        error_body(status, code, message, param),
        status,
        media_type="application/json",
        headers=response_headers(exc),
    )


def _limits(state: ServerState) -> GenerationLimits:
    limits = state.config.limits
    return GenerationLimits(
        max_body_bytes=min(limits.max_request_bytes, MAX_BODY_BYTES),
        max_new_tokens=limits.max_new_tokens,
    )


def _generative(state: ServerState, principal: Principal, name: str) -> ModelRecord:
    record = state.model_for(principal, name, Action.RUN)
    if record.kind != "generative":
        raise ParameterError(
            "not_generative",
            "this model is a tensor model: run it with POST /v2/models/{name}/infer",
            "model",
        )
    return record


@_openai_errors
async def list_models(request: Request) -> Response:
    state = _state(request)
    principal = state.principal(request)
    authorize(principal, Action.LIST)
    records = state.registry.records(
        lambda r: r.kind == "generative" and visible_to(principal, r.owner, r.shared_with)
    )
    data = []
    for record in records:
        owner, _ = sharing_view(principal, record.owner, record.shared_with)
        data.append(
            {
                "id": record.name,
                "object": "model",
                "created": int(record.created_at),
                "owned_by": owner if owner is not None else "shared",
            }
        )
    return _json({"object": "list", "data": data})


@_openai_errors
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    principal = state.principal(request)
    limits = _limits(state)
    body = await read_bounded(request, limits.max_body_bytes, setting="--max-request-bytes")
    parsed = parse_chat_completion_request(body, limits)
    record = _generative(state, principal, parsed.model)
    prompt = {"messages": [{"role": m.role, "content": m.content} for m in parsed.messages]}
    answer = _Answer(
        chat=True,
        model=parsed.model,
        include_usage=parsed.include_usage,
        receipt=_Receipt(record, prompt, parsed.sampling),
    )
    events = generate(state, principal.tenant, record, prompt, parsed.sampling)
    return await answer.respond(request, state, principal, events, stream=parsed.stream)


@_openai_errors
async def completions(request: Request) -> Response:
    state = _state(request)
    principal = state.principal(request)
    limits = _limits(state)
    body = await read_bounded(request, limits.max_body_bytes, setting="--max-request-bytes")
    parsed = parse_completion_request(body, limits)
    record = _generative(state, principal, parsed.model)
    prompt = {"text": parsed.prompt}
    answer = _Answer(
        chat=False,
        model=parsed.model,
        include_usage=parsed.include_usage,
        receipt=_Receipt(record, prompt, parsed.sampling),
    )
    events = generate(state, principal.tenant, record, prompt, parsed.sampling)
    return await answer.respond(request, state, principal, events, stream=parsed.stream)


def _finish(end: GenerationEnd) -> FinishReason:
    return cast(FinishReason, end.finish_reason if end.finish_reason == "stop" else "length")


@dataclass(frozen=True, slots=True)
class _Receipt:
    """What a completion's receipt signs besides the answer: the model and the request."""

    record: ModelRecord
    prompt: Mapping[str, object]
    sampling: SamplingParams


class _Answer:
    """One chat or text completion, whole or streamed."""

    def __init__(self, *, chat: bool, model: str, include_usage: bool, receipt: _Receipt) -> None:
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.model = model
        self.include_usage = include_usage
        self.receipt = receipt

    async def _sign(
        self, state: ServerState, text: str, end: GenerationEnd
    ) -> dict[str, str] | None:
        signed = self.receipt
        return await generation_receipt(
            state,
            signed.record,
            request_id=self.id,
            prompt=signed.prompt,
            sampling=signed.sampling,
            text=text,
            end=end,
        )

    async def respond(
        self,
        request: Request,
        state: ServerState,
        principal: Principal,
        events: AsyncGenerator[GenerationEvent, None],
        *,
        stream: bool,
    ) -> Response:
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(tenant_slot(request, state.quotas, principal.tenant))
            stack.push_async_callback(events.aclose)
            # the first event before answering 200: a refusal (context too long, model
            # gone, worker busy) is still an HTTP error, not an event in a stream
            first = await anext(events)
        except BaseException:
            await stack.aclose()
            raise
        if not stream:
            async with stack:
                return await self._whole(state, first, events, request)
        return StreamingResponse(
            self._events(request, state, first, events, stack), headers=dict(sse.HEADERS)
        )

    async def _collect(
        self, first: GenerationEvent, events: AsyncGenerator[GenerationEvent, None]
    ) -> tuple[str, GenerationEnd]:
        pieces: list[str] = []
        event = first
        while not isinstance(event, GenerationEnd):
            pieces.append(event)
            event = await anext(events)
        return "".join(pieces), event

    async def _whole(
        self,
        state: ServerState,
        first: GenerationEvent,
        events: AsyncGenerator[GenerationEvent, None],
        request: Request,
    ) -> Response:
        # a client that leaves before its whole answer stops the generation too
        text, end = await until_disconnect(request, self._collect(first, events))
        receipt = await self._sign(state, text, end)
        if self.chat:
            body = chat_completion(
                id=self.id,
                created=self.created,
                model=self.model,
                content=text,
                finish_reason=_finish(end),
                usage=end.usage,
                receipt=receipt,
            )
        else:
            body = text_completion(
                id=self.id,
                created=self.created,
                model=self.model,
                text=text,
                finish_reason=_finish(end),
                usage=end.usage,
                receipt=receipt,
            )
        return Response(body, media_type="application/json")

    async def _events(
        self,
        request: Request,
        state: ServerState,
        first: GenerationEvent,
        events: AsyncGenerator[GenerationEvent, None],
        stack: AsyncExitStack,
    ) -> AsyncIterator[bytes]:
        """The stream's events; leaving early (the client went away: Starlette cancels
        this generator) closes `events`, which cancels the generation in the worker."""
        async with stack:
            if self.chat:
                chat = ChatCompletionStream(self.id, self.created, self.model, self.include_usage)
                renderer: ChatCompletionStream | CompletionStream = chat
                yield chat.start()
            else:
                renderer = CompletionStream(self.id, self.created, self.model, self.include_usage)
            event = first
            pieces: list[str] = []  # the answer as sent: its receipt signs it
            try:
                while not isinstance(event, GenerationEnd):
                    pieces.append(event)
                    yield renderer.text(event)
                    event = await anext(events)
                receipt = await self._sign(state, "".join(pieces), event)
            except Exception as exc:
                status, code, message = status_and_code(exc)
                if status >= 500:
                    log.error("a stream failed with %s (%s)", type(exc).__name__, where(request))
                yield error_event(status, code, message)
                return
            yield renderer.end(_finish(event), event.usage, receipt)


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
