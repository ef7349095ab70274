"""The Open Inference Protocol's generate extension, as Triton serves it, for generative models.

- `POST /v2/models/{name}[/versions/1]/generate`: one JSON object
  `{"model_name", "model_version", "text_output", "finish_reason", "prompt_tokens",
  "completion_tokens"}`.
- `POST /v2/models/{name}[/versions/1]/generate_stream`: server-sent events, one object per
  piece of text, the last one with the finish reason and token counts (no `[DONE]`: the
  stream ends with the response, as Triton's does).

The request (`{"text_input", "parameters"}`) is parsed by `protocol.oip_generate` with the
same bounds as the OpenAI API's; the text goes to the model as a plain prompt, exactly as
`POST /v1/completions` sends its `prompt`, so the two routes give the same greedy tokens.

Same API keys, tenants, visibility (a model the caller may not see is the same 404 as a
missing one), concurrency slots and body bounds as every other route. Errors before the
stream starts are the app's OIP errors (`{"error", "code"}`, raised to the one mapping in
`server.errors`, as `/infer` answers); after it started, the same object as the last
event. A tensor model is refused with 400 `not_generative`. A client that goes away,
mid-stream or before its whole answer (`server.disconnect`), cancels its generation (the
worker stops between two tokens). Every generation is admitted within its tenant's tokens
per minute, generations at once and KV-cache budget (`server.generation_quota.generate`),
as on /v1.

Every finished generation carries its signed receipt (`server.generation_receipt`, no
opt-in) as a top-level `"receipt"`: on the `/generate` object, or on the stream's last
event. The receipt's `request_id` is a fresh `generate-...` id; its prompt document is
`{"prompt": text_input}`, as for `/v1/completions`. A cancelled generation has none.

Nothing here logs a prompt, an answer or a model name.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
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
from blindinfer.protocol.oip_generate import (
    error_event,
    generate_response,
    parse_generate_request,
    stream_end,
    stream_text,
)
from blindinfer.protocol.openai_responses import new_id
from blindinfer.server import generation_quota
from blindinfer.server.auth import Action
from blindinfer.server.bodies import read_bounded
from blindinfer.server.body_guard import tenant_slot
from blindinfer.server.disconnect import until_disconnect
from blindinfer.server.errors import status_and_code, where
from blindinfer.server.generation_receipt import generation_receipt
from blindinfer.server.respond import server_state as _state
from blindinfer.server.routes.inference import MODEL_VERSION
from blindinfer.server.routes.openai import MAX_BODY_BYTES
from blindinfer.server.state import ServerState
from blindinfer.store.errors import UnknownModelError
from blindinfer.store.registry import GenerationEnd, GenerationEvent
from blindinfer.store.sealed import ModelRecord

log = logging.getLogger("blindinfer.server")

Events = AsyncGenerator[GenerationEvent, None]


def _limits(state: ServerState) -> GenerationLimits:
    limits = state.config.limits
    return GenerationLimits(
        max_body_bytes=min(limits.max_request_bytes, MAX_BODY_BYTES),
        max_new_tokens=limits.max_new_tokens,
    )


def _generative(record: ModelRecord) -> ModelRecord:
    if record.kind != "generative":
        raise ParameterError(
            "not_generative",
            "this model is a tensor model: run it with POST /v2/models/{name}/infer",
        )
    return record


def _finish(end: GenerationEnd) -> FinishReason:
    return cast(FinishReason, end.finish_reason if end.finish_reason == "stop" else "length")


async def generate(request: Request) -> Response:
    """`/generate`: the whole answer as one object."""
    return await _generate(request, streaming=False)


async def generate_stream(request: Request) -> Response:
    """`/generate_stream`: the answer as server-sent events."""
    return await _generate(request, streaming=True)


async def _generate(request: Request, *, streaming: bool) -> Response:
    state = _state(request)
    principal = state.principal(request)
    version = request.path_params.get("version")
    if version is not None and version != MODEL_VERSION:
        raise UnknownModelError(
            f"model version {version[:20]!r} does not exist; use {MODEL_VERSION!r}"
        )
    record = _generative(state.model_for(principal, request.path_params["ref"], Action.RUN))
    limits = _limits(state)
    body = await read_bounded(request, limits.max_body_bytes, setting="--max-request-bytes")
    parsed = parse_generate_request(body, limits, streaming=streaming)
    prompt = {"text": parsed.text_input}
    receipt = _Receipt(state, record, prompt, parsed.sampling)
    # within the tenant's tokens per minute, generations at once and KV-cache budget
    events = generation_quota.generate(state, principal.tenant, record, prompt, parsed.sampling)
    stack = AsyncExitStack()
    try:
        await stack.enter_async_context(tenant_slot(request, state.quotas, principal.tenant))
        stack.push_async_callback(events.aclose)
        # the first event before answering 200: a refusal (context too long, model gone,
        # worker busy) is still an HTTP error, not an event in a stream
        first = await anext(events)
    except BaseException:
        await stack.aclose()
        raise
    if not streaming:
        async with stack:
            # a client that leaves before its whole answer stops the generation too
            text, end = await until_disconnect(request, _collect(first, events))
        return Response(
            generate_response(
                model_name=record.name,
                model_version=MODEL_VERSION,
                text_output=text,
                finish_reason=_finish(end),
                usage=end.usage,
                receipt=await receipt.sign(text, end),
            ),
            media_type="application/json",
        )
    return StreamingResponse(
        _events(request, record.name, receipt, first, events, stack), headers=dict(sse.HEADERS)
    )


@dataclass(frozen=True, slots=True)
class _Receipt:
    """What the generation's receipt signs besides the answer: the model and the request."""

    state: ServerState
    record: ModelRecord
    prompt: Mapping[str, object]
    sampling: SamplingParams
    request_id: str = field(default_factory=lambda: new_id("generate-"))

    async def sign(self, text: str, end: GenerationEnd) -> dict[str, str] | None:
        """The receipt of a finished generation whose answer, as sent, was `text`."""
        return await generation_receipt(
            self.state,
            self.record,
            request_id=self.request_id,
            prompt=self.prompt,
            sampling=self.sampling,
            text=text,
            end=end,
        )


async def _collect(first: GenerationEvent, events: Events) -> tuple[str, GenerationEnd]:
    pieces: list[str] = []
    event = first
    while not isinstance(event, GenerationEnd):
        pieces.append(event)
        event = await anext(events)
    return "".join(pieces), event


async def _events(
    request: Request,
    name: str,
    receipt: _Receipt,
    first: GenerationEvent,
    events: Events,
    stack: AsyncExitStack,
) -> AsyncIterator[bytes]:
    """The stream's events, the receipt on the last; leaving early (the client went away:
    Starlette cancels this generator) closes `events`, which cancels the generation in the
    worker."""
    async with stack:
        event = first
        pieces: list[str] = []  # the answer as sent: its receipt signs it
        try:
            while not isinstance(event, GenerationEnd):
                pieces.append(event)
                yield stream_text(model_name=name, model_version=MODEL_VERSION, text_output=event)
                event = await anext(events)
            signed = await receipt.sign("".join(pieces), event)
        except Exception as exc:
            status, code, message = status_and_code(exc)
            if status >= 500:
                log.error("a stream failed with %s (%s)", type(exc).__name__, where(request))
            yield error_event(code, message)
            return
        yield stream_end(
            model_name=name,
            model_version=MODEL_VERSION,
            finish_reason=_finish(event),
            usage=event.usage,
            receipt=signed,
        )


routes = [
    Route("/v2/models/{ref}/generate", generate, methods=["POST"]),
    Route("/v2/models/{ref}/versions/{version}/generate", generate, methods=["POST"]),
    Route("/v2/models/{ref}/generate_stream", generate_stream, methods=["POST"]),
    Route("/v2/models/{ref}/versions/{version}/generate_stream", generate_stream, methods=["POST"]),
]
