"""The receipt of one generation, for every front end that generates (OpenAI, OIP generate).

Every finished generation is receipted, with no opt-in: the receipt is what lets an answer
be proven later, and it costs one ES256 signature and a few hashes. It signs the model's
hash, the digests of the prompt as the client sent it and as the model's tokens, of the
answer as the client received it and as tokens, the sampling parameters (seed included),
the finish reason and the token counts (`blindinfer.protocol.receipts.generation_fields`,
format in docs/receipts.md). A cancelled generation (its client went away) gets none: no
one is there to receive it, and its answer was never complete.

Callers sign on a worker thread (`generation_answer.Signed`): a prompt may be megabytes,
and the first receipt after start-up makes the boot evidence (a TEE quote).
"""

from __future__ import annotations

from collections.abc import Mapping

from blindinfer.protocol.generation import SamplingParams
from blindinfer.protocol.receipts import GENERATION_KIND, generation_fields, prompt_document
from blindinfer.server.state import ServerState
from blindinfer.store.registry import GenerationEnd
from blindinfer.store.sealed import ModelRecord

__all__ = ["sign_generation_receipt"]


def sign_generation_receipt(
    state: ServerState,
    record: ModelRecord,
    *,
    request_id: str,
    prompt: Mapping[str, object],
    sampling: SamplingParams,
    text: str,
    end: GenerationEnd,
) -> dict[str, str] | None:
    """The JWS receipt of a generation that ended ("stop" or "length"); None if it was
    cancelled. `prompt` is what `ModelRegistry.generate_async` was given
    (`{"messages": [...]}` or `{"text": ...}`), `text` the whole answer as sent, `request_id`
    the id the response carries."""
    if end.finish_reason not in ("stop", "length"):
        return None
    if "messages" in prompt:
        messages = prompt["messages"]
        assert isinstance(messages, list)
        document = prompt_document(messages=messages)
    else:
        document = prompt_document(prompt=prompt["text"])
    fields = generation_fields(
        prompt=document,
        sampling=sampling.as_dict(),
        output_text=text,
        finish_reason=end.finish_reason,
        prompt_token_ids=end.prompt_token_ids,
        output_token_ids=end.output_token_ids,
    )
    return state.receipt(GENERATION_KIND, record, request_id=request_id, **fields)
