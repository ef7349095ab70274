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

Every finished completion carries its signed receipt (`server.generation_answer`, always,
no opt-in) as a top-level `"receipt"`: on the whole object, or on the stream's last chunk
before `[DONE]`. A failed or cancelled generation has none.

Nothing here logs a prompt, an answer or a model name.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from blindinfer.protocol import sse
from blindinfer.protocol.generation import ParameterError
from blindinfer.protocol.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
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
from blindinfer.server import generation_answer as answer
from blindinfer.server.auth import Action, Principal, authorize, sharing_view, visible_to
from blindinfer.server.bodies import read_bounded
from blindinfer.server.errors import response_headers, status_and_code, where
from blindinfer.server.generation_quota import generate
from blindinfer.server.respond import json_response as _json
from blindinfer.server.respond import server_state as _state
from blindinfer.server.state import ServerState
from blindinfer.store.sealed import ModelRecord

log = logging.getLogger("blindinfer.server")

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


def _generative(state: ServerState, principal: Principal, name: str) -> ModelRecord:
    return answer.require_generative(state.model_for(principal, name, Action.RUN), "model")


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
    return await _complete(request, chat=True)


@_openai_errors
async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


async def _complete(request: Request, *, chat: bool) -> Response:
    """A chat or text completion, whole or streamed (`generation_answer` does the rest)."""
    state = _state(request)
    principal = state.principal(request)
    limits = answer.generation_limits(state)
    body = await read_bounded(request, limits.max_body_bytes, setting="--max-request-bytes")
    parsed: ChatCompletionRequest | CompletionRequest
    prompt: Mapping[str, object]
    if chat:
        parsed = parse_chat_completion_request(body, limits)
        prompt = {"messages": [{"role": m.role, "content": m.content} for m in parsed.messages]}
    else:
        parsed = parse_completion_request(body, limits)
        prompt = {"text": parsed.prompt}
    model, sampling = parsed.model, parsed.sampling
    record = _generative(state, principal, model)
    completion_id, created = new_id("chatcmpl" if chat else "cmpl"), now()
    signed = answer.Signed(state, record, completion_id, prompt, sampling)
    # within the tenant's tokens per minute, generations at once and KV-cache budget
    events = generate(state, principal.tenant, record, prompt, sampling)
    first, stack = await answer.start(request, state, principal.tenant, events)
    if not parsed.stream:
        text, end, receipt = await answer.whole(request, first, events, stack, signed)
        finish = answer.finish_reason(end)
        if chat:
            body = chat_completion(
                id=completion_id,
                created=created,
                model=model,
                content=text,
                finish_reason=finish,
                usage=end.usage,
                receipt=receipt,
            )
        else:
            body = text_completion(
                id=completion_id,
                created=created,
                model=model,
                text=text,
                finish_reason=finish,
                usage=end.usage,
                receipt=receipt,
            )
        return Response(body, media_type="application/json")
    renderer: ChatCompletionStream | CompletionStream
    if chat:
        renderer = ChatCompletionStream(completion_id, created, model, parsed.include_usage)
        opening = renderer.start()
    else:
        renderer = CompletionStream(completion_id, created, model, parsed.include_usage)
        opening = b""
    return StreamingResponse(
        answer.relay(
            request,
            first,
            events,
            stack,
            signed,
            text=renderer.text,
            end=renderer.end,
            error=error_event,
            opening=opening,
        ),
        headers=dict(sse.HEADERS),
    )


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
