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

Every finished generation carries its signed receipt (`server.generation_answer`, no
opt-in) as a top-level `"receipt"`: on the `/generate` object, or on the stream's last
event. The receipt's `request_id` is a fresh `generate-...` id; its prompt document is
`{"prompt": text_input}`, as for `/v1/completions`. A cancelled generation has none.

Nothing here logs a prompt, an answer or a model name.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from blindinfer.protocol import sse
from blindinfer.protocol.generation import FinishReason, Usage
from blindinfer.protocol.oip_generate import (
    error_event,
    generate_response,
    parse_generate_request,
    stream_end,
    stream_text,
)
from blindinfer.protocol.openai_responses import new_id
from blindinfer.server import generation_answer as answer
from blindinfer.server import generation_quota
from blindinfer.server.auth import Action
from blindinfer.server.bodies import read_bounded
from blindinfer.server.respond import server_state as _state
from blindinfer.server.routes.inference import MODEL_VERSION
from blindinfer.store.errors import UnknownModelError


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
    record = answer.require_generative(
        state.model_for(principal, request.path_params["ref"], Action.RUN)
    )
    limits = answer.generation_limits(state)
    body = await read_bounded(request, limits.max_body_bytes, setting="--max-request-bytes")
    parsed = parse_generate_request(body, limits, streaming=streaming)
    prompt = {"text": parsed.text_input}
    signed = answer.Signed(state, record, new_id("generate-"), prompt, parsed.sampling)
    # within the tenant's tokens per minute, generations at once and KV-cache budget
    events = generation_quota.generate(state, principal.tenant, record, prompt, parsed.sampling)
    first, stack = await answer.start(request, state, principal.tenant, events)
    if not streaming:
        text, end, receipt = await answer.whole(request, first, events, stack, signed)
        return Response(
            generate_response(
                model_name=record.name,
                model_version=MODEL_VERSION,
                text_output=text,
                finish_reason=answer.finish_reason(end),
                usage=end.usage,
                receipt=receipt,
            ),
            media_type="application/json",
        )

    def render_text(piece: str) -> bytes:
        return stream_text(model_name=record.name, model_version=MODEL_VERSION, text_output=piece)

    def render_end(finish: FinishReason, usage: Usage, receipt: dict[str, str] | None) -> bytes:
        return stream_end(
            model_name=record.name,
            model_version=MODEL_VERSION,
            finish_reason=finish,
            usage=usage,
            receipt=receipt,
        )

    return StreamingResponse(
        answer.relay(
            request,
            first,
            events,
            stack,
            signed,
            text=render_text,
            end=render_end,
            error=lambda _status, code, message: error_event(code, message),
        ),
        headers=dict(sse.HEADERS),
    )


routes = [
    Route("/v2/models/{ref}/generate", generate, methods=["POST"]),
    Route("/v2/models/{ref}/versions/{version}/generate", generate, methods=["POST"]),
    Route("/v2/models/{ref}/generate_stream", generate_stream, methods=["POST"]),
    Route("/v2/models/{ref}/versions/{version}/generate_stream", generate_stream, methods=["POST"]),
]
