"""Batched generation: several requests to one model share each decoding step.

onnxruntime-genai 0.18's `og.Engine` schedules requests into one batch per step (its
default "static" mode, up to 4 requests, on the builder's CPU exports). Each request's
tokens go through the same `TokenText` as a single `Generation` (stop tokens, stop strings,
held-back text, max_tokens), and the same `GenerativeSession.check` bounds run first, so a
request's answer is the same through either path (greedy: token-identical, tested).

Not covered: a per-request seed needs the Engine's dynamic batching, which needs a decoder
exported with a paged KV cache; `submit` refuses seeded requests with `seed_not_batched`,
and the server sends those to a `GenerativeSession.generate` of their own.

The Engine must be driven from the thread that created it: one `BatchedGenerator` per
model per worker thread, which calls `step()` (or iterates a `BatchedGeneration`, which
steps the whole batch until that request has a token).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from blindinfer.protocol.generation import FinishReason, SamplingParams
from blindinfer.runtime.errors import ExecutionError, GenerationRequestError
from blindinfer.runtime.generative import GeneratedToken, GenerativeSession, TokenText


class BatchedGeneration:
    """One request in a `BatchedGenerator`: iterate for tokens; `close()` cancels it (its
    KV cache rows are released at the Engine's next step)."""

    def __init__(
        self,
        owner: BatchedGenerator,
        request: Any,
        turn: int,
        text: TokenText,
        prompt_tokens: int,
    ) -> None:
        self._owner = owner
        self._request: Any = request
        self._turn = turn
        self._text = text
        self._ready: deque[GeneratedToken] = deque()
        self.prompt_tokens = prompt_tokens
        self.finish_reason: FinishReason | None = None

    @property
    def completion_tokens(self) -> int:
        return self._text.count

    @property
    def done(self) -> bool:
        return self._request is None

    def close(self) -> None:
        """Cancel now: no further token of this request is delivered."""
        self._ready.clear()
        self._end(None)

    def _end(self, reason: FinishReason | None) -> None:
        request, self._request = self._request, None
        if request is None:
            return
        if reason is None or self._owner.active(request):
            request.cancel_turn(self._turn)
        self._owner.forget(request)
        if reason is not None:
            self.finish_reason = reason

    def _on_token(self, token: int) -> None:
        if self._request is None:
            return
        piece, finish = self._text.feed(token)
        self._ready.append(piece)
        if finish is not None:
            self._end(finish)

    def _on_finished(self, reason: Any, og: Any) -> None:
        """The Engine ended the turn itself (end of sequence, length, failure)."""
        if self._request is None:
            return
        if reason == og.FinishReason.FAILED:
            self._end(None)
            raise ExecutionError("the model failed while generating")
        eos = self._owner.eos_token_id
        if reason == og.FinishReason.EOS and eos is not None:
            # The Engine ends at end of sequence without a token event for it, where
            # og.Generator yields that token: deliver it, so that counts and token ids
            # (usage, receipts) are the same through both paths.
            self._on_token(eos)
            if self._request is None:
                return
        self._end("length" if reason == og.FinishReason.MAX_GENERATED_TOKENS else "stop")

    def take(self) -> list[GeneratedToken]:
        """The tokens ready now, without stepping (for a caller that steps the batch itself,
        e.g. one that serves several requests in turn)."""
        ready = list(self._ready)
        self._ready.clear()
        return ready

    def __iter__(self) -> Iterator[GeneratedToken]:
        return self

    def __next__(self) -> GeneratedToken:
        while not self._ready:
            if self._request is None:
                raise StopIteration
            self._owner.step()
        return self._ready.popleft()


class BatchedGenerator:
    """An `og.Engine` over a loaded `GenerativeSession`, for requests without a seed."""

    def __init__(self, session: GenerativeSession, *, event_capacity: int = 256) -> None:
        self._session = session
        self._og: Any = session._og
        self._engine: Any = self._og.Engine(session._model)
        self._events: Any = self._engine.create_event_buffer(event_capacity)
        self._live: dict[int, tuple[Any, BatchedGeneration]] = {}
        eos = session.eos_token_ids
        # the token an end of sequence stands for; None when the model has several (the
        # Engine does not say which one it met: such models are served by og.Generator)
        self.eos_token_id: int | None = next(iter(eos)) if len(eos) == 1 else None

    @property
    def exact(self) -> bool:
        """Whether answers (token ids and counts) are exactly og.Generator's: yes unless the
        model has several end-of-sequence tokens."""
        return self.eos_token_id is not None

    @property
    def max_batch_size(self) -> int:
        return int(self._engine.get_capabilities().configured_max_batch_size)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Collection[int] = (),
    ) -> BatchedGeneration:
        """Queue a request; it joins the batch at the Engine's next step. A token of
        `stop_token_ids` (or the model's end of sequence) ends its answer."""
        self._session.check(prompt_ids, params, stop_token_ids)
        if params.seed is not None:
            raise GenerationRequestError(
                "seed_not_batched", "a seeded request is not served by the batched engine"
            )
        import numpy as np

        og = self._og
        request = self._engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(params.max_tokens)
        options.set_do_sample(not params.greedy)
        if not params.greedy:
            options.set_temperature(params.temperature)
            options.set_top_p(params.top_p)
            options.set_top_k(self._session.top_k(params))
        try:
            turn = request.begin_turn(np.asarray(prompt_ids, dtype=np.int32), options)
        except RuntimeError:
            request.close()
            raise GenerationRequestError(
                "invalid_prompt", "the model could not process this prompt"
            ) from None
        stop_ids = self._session.stop_ids(stop_token_ids)
        text = TokenText(self._session._tokenizer.create_stream(), params, stop_ids)
        generation = BatchedGeneration(self, request, turn, text, len(prompt_ids))
        self._live[id(request)] = (request, generation)
        return generation

    def active(self, request: Any) -> bool:
        return id(request) in self._live and bool(self._engine.has_pending_requests())

    def forget(self, request: Any) -> None:
        self._live.pop(id(request), None)

    def pending(self) -> bool:
        return bool(self._engine.has_pending_requests())

    def step(self) -> None:
        """One decoding step for every request in the batch; tokens go to their requests."""
        og = self._og
        if not self._engine.has_pending_requests():
            return
        self._engine.run(self._events)
        token_flag = og.EngineEventFlags.TOKEN
        finished_flag = og.EngineEventFlags.TURN_FINISHED
        for i in range(len(self._events)):
            event = self._events[i]
            entry = self._live.get(id(event.request))
            if entry is None:
                continue  # cancelled by its caller: nothing more is delivered
            generation = entry[1]
            if event.flags & token_flag:
                generation._on_token(int(event.token))
            if event.flags & finished_flag:
                generation._on_finished(event.finish_reason, og)
