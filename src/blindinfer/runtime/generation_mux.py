"""Many generations in one worker process, multiplexed by request id (the worker's side).

The worker's loop (`workers._worker_main`) hands every `generate` and `cancel` it reads to a
`GenerationMux` and, while generations are active, calls `step()` between two reads of its
pipe: a request that arrives mid-batch joins at once, a `cancel` stops its generation before
the next step, and every frame names its request's id.

How requests share the model (onnxruntime-genai 0.18 on the builder's CPU exports):
- Without a seed: a `BatchedGenerator` (og's static-batching Engine). A static batch is
  fixed once it has run a step (a request submitted later waits for the whole batch to end,
  found by trying it), so requests that arrive while a batch runs go into a new Engine of
  the same model, stepped in turn with the first; the requests that arrive together (one
  `generate` frame, or frames read between the same two steps) share each step. Greedy
  answers are token-identical to a lone `og.Generator` either way (tested).
- Alone (no other generation running on this worker, and none arriving with it, in its
  frame or before the next step): its own `og.Generator`, as a seeded request. A lone
  request pays neither the Engine's scheduling before its first token (measured 4.5-10 ms
  warm, ~88 ms for a new Engine) nor its extra CPU per token. Its generator is made at the
  next step, so that a request read before then shares an Engine with it; requests that
  arrive later join an Engine stepped in turn with it.
- With a seed: its own `og.Generator` (the Engine refuses per-request seeds without a paged
  KV cache), stepped once per round with the batch, so a seeded answer is exactly the answer
  it gets alone. So is every request to a model with several end-of-sequence tokens: the
  Engine ends a turn at end of sequence without saying which token it met, and the answer's
  token ids (signed by receipts) must be exact.

A cancelled request's Engine request is cancelled and forgotten at once; an Engine left with
only cancelled requests is still stepped once, so og releases their KV-cache rows then, not
when the next request comes. Final frames carry the ids fed and generated (for receipts) and
`peak_batch`: the most requests that shared one Engine step with this one (1 when alone or
seeded, even if others joined later), which the server exposes in its worker statistics;
`solo_started` counts the generations run on their own og.Generator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from blindinfer.errors import ProtocolError
from blindinfer.protocol.generation import SamplingParams
from blindinfer.runtime.generative import GeneratedToken, Generation, GenerativeSession
from blindinfer.runtime.generative_batch import BatchedGeneration, BatchedGenerator

__all__ = ["GenerationMux"]

Frame = dict[str, Any]

_IDLE_ENGINES = 2
"""Idle Engines kept per model for the next requests (creating one costs a few ms)."""


@dataclass(slots=True)
class _Live:
    """One running generation and what its final frame reports."""

    rid: int
    generation: BatchedGeneration | Generation
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    peak_batch: int = 1


@dataclass(slots=True)
class _Lone:
    """A request alone so far: it gets its own og.Generator at the next step, unless another
    request comes first (both then share an Engine)."""

    rid: int
    key: str
    session: GenerativeSession
    ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class _Group:
    """One Engine and the requests of its current static batch."""

    batcher: BatchedGenerator
    members: dict[int, _Live] = field(default_factory=dict)
    started: bool = False


def _params(raw: Mapping[str, Any]) -> SamplingParams:
    return SamplingParams(
        max_tokens=raw["max_tokens"],
        temperature=raw["temperature"],
        top_p=raw["top_p"],
        top_k=raw["top_k"],
        seed=raw["seed"],
        stop=tuple(raw["stop"]),
    )


class GenerationMux:
    """The generations of one worker process. `send(frame)` writes one frame to the server.
    Not thread-safe: the worker's loop is its only caller (og's Engine wants one thread)."""

    def __init__(self, send: Callable[[Frame], None]) -> None:
        self._send = send
        self._groups: dict[str, list[_Group]] = {}
        self._solo: dict[int, _Live] = {}
        self._lone: _Lone | None = None
        self.solo_started = 0
        """Generations started on their own og.Generator (alone, seeded or multi-EOS)."""

    @property
    def active(self) -> bool:
        """Whether `step()` has work: live generations, or an Engine to release rows in."""
        return (
            self._lone is not None
            or bool(self._solo)
            or any(g.members or g.batcher.pending() for gs in self._groups.values() for g in gs)
        )

    @property
    def live(self) -> int:
        """Generations running now."""
        engines = sum(len(g.members) for gs in self._groups.values() for g in gs)
        return (self._lone is not None) + len(self._solo) + engines

    def start(self, session: object, key: str, request: Mapping[str, Any]) -> None:
        """Starts one generation (`request`: id, prompt, params); it runs from the next step:
        on its own og.Generator if it is still the only one then (a lone request's fastest
        path), else in an Engine batch. Raises for a request the model refuses (nothing is
        kept then)."""
        rid = request["id"]
        if type(rid) is not int:
            raise ProtocolError("invalid_request", "a generation needs an integer id")
        if not isinstance(session, GenerativeSession):
            raise ProtocolError("not_generative", "this model does not generate text")
        params = _params(request["params"])
        prompt = request["prompt"]
        if "messages" in prompt:
            ids = session.chat_prompt_ids(prompt["messages"])
        else:
            ids = session.encode(prompt["text"])
        if params.seed is not None or len(session.eos_token_ids) != 1:
            self._solo[rid] = _Live(rid, session.generate(ids, params), ids)
            self.solo_started += 1
            return
        if self.live == 0:
            session.check(ids, params)  # a refusal now, as from the other paths
            self._lone = _Lone(rid, key, session, ids, params)
            return
        self._batch_lone()  # it is not alone any more: it shares the Engine with this one
        group = self._forming(key, session)
        group.members[rid] = _Live(rid, group.batcher.submit(ids, params), ids)

    def cancel(self, rid: object) -> None:
        """Stops that generation now and sends its final frame; an id that already ended
        (its final frame is on its way) is ignored."""
        lone = self._lone
        if lone is not None and lone.rid == rid:
            self._lone = None
            self._final(lone, "cancelled")
            return
        live = self._solo.pop(rid, None) if type(rid) is int else None
        if live is None:
            for groups in self._groups.values():
                for group in groups:
                    live = group.members.pop(rid, None)  # type: ignore[call-overload]
                    if live is not None:
                        break
                if live is not None:
                    break
        if live is not None:
            live.generation.close()
            self._final(live, "cancelled")

    def forget(self, key: str) -> None:
        """The model was unloaded or replaced: its idle Engines go (running ones finish)."""
        groups = self._groups.get(key, [])
        kept = [g for g in groups if g.members or g.batcher.pending()]
        if kept:
            self._groups[key] = kept
        else:
            self._groups.pop(key, None)

    def fail_all(self, error: Frame) -> None:
        """Ends every generation with `error` (a frame without id): the worker is failing."""
        lives = list(self._solo.values())
        lives += [v for gs in self._groups.values() for g in gs for v in g.members.values()]
        lone, self._lone = self._lone, None
        self._solo.clear()
        self._groups.clear()
        for live in lives:
            live.generation.close()
            self._send(dict(error, id=live.rid))
        if lone is not None:
            self._send(dict(error, id=lone.rid))

    def step(self) -> None:
        """One round: one step of every Engine with requests, one token of every seeded
        generation; frames for what they produced. A failure of one Engine or generation
        ends its requests with an error frame; a memory failure is raised (the worker then
        fails everything and is replaced)."""
        self._start_lone()
        for groups in list(self._groups.values()):
            for group in groups:
                self._step_group(group)
        for rid, live in list(self._solo.items()):
            generation = live.generation
            assert isinstance(generation, Generation)
            try:
                token = next(generation)
            except StopIteration:
                token = None
            except Exception as exc:
                if _is_memory_failure(exc):
                    raise
                self._solo.pop(rid, None)
                generation.close()
                self._error(live.rid, exc)
                continue
            if token is not None:
                self._deliver(live, token)
            if generation.closed:
                self._solo.pop(rid, None)
                self._final(live, generation.finish_reason or "length")

    # -- internals ----------------------------------------------------------------------------

    def _start_lone(self) -> None:
        """The lone request is still alone at its first step: its own og.Generator."""
        lone = self._lone
        if lone is None:
            return
        try:
            generation = lone.session.generate(lone.ids, lone.params)
        except Exception as exc:
            if _is_memory_failure(exc):
                raise  # fail_all ends it with the others
            self._lone = None
            self._error(lone.rid, exc)
            return
        self._lone = None
        self._solo[lone.rid] = _Live(lone.rid, generation, lone.ids)
        self.solo_started += 1

    def _batch_lone(self) -> None:
        """Another request came before the lone one's first step: it goes to an Engine too."""
        lone = self._lone
        if lone is None:
            return
        group = self._forming(lone.key, lone.session)
        try:
            generation = group.batcher.submit(lone.ids, lone.params)
        except Exception as exc:
            if _is_memory_failure(exc):
                raise  # fail_all ends it with the others
            self._lone = None
            self._error(lone.rid, exc)  # its own error, not the newcomer's
            return
        self._lone = None
        group.members[lone.rid] = _Live(lone.rid, generation, lone.ids)

    def _forming(self, key: str, session: GenerativeSession) -> _Group:
        """An Engine of this model whose batch has not run yet and has room, else a new one."""
        groups = self._groups.setdefault(key, [])
        idle = [g for g in groups if not g.members and not g.batcher.pending()]
        for extra in idle[_IDLE_ENGINES:]:
            groups.remove(extra)
        for group in groups:
            if not group.started and len(group.members) < group.batcher.max_batch_size:
                return group
        group = _Group(BatchedGenerator(session))
        groups.append(group)
        return group

    def _step_group(self, group: _Group) -> None:
        if not group.members:
            if group.batcher.pending():  # only cancelled requests left: og frees their rows
                group.batcher.step()
            if not group.batcher.pending():
                group.started = False
            return
        group.started = True
        size = len(group.members)
        try:
            group.batcher.step()
        except Exception as exc:
            if _is_memory_failure(exc):
                raise  # the worker fails every generation and is replaced
            lives = list(group.members.values())
            group.members.clear()
            for live in lives:
                live.generation.close()
                self._error(live.rid, exc)
            return
        for rid, live in list(group.members.items()):
            live.peak_batch = max(live.peak_batch, size)
            generation = live.generation
            assert isinstance(generation, BatchedGeneration)
            for token in generation.take():
                self._deliver(live, token)
            if generation.done:
                del group.members[rid]
                self._final(live, generation.finish_reason or "length")
        if not group.members and not group.batcher.pending():
            group.started = False

    def _deliver(self, live: _Live, token: GeneratedToken) -> None:
        live.output_ids.append(token.token_id)
        if token.text:
            self._send({"ok": True, "id": live.rid, "text": token.text})

    def _final(self, live: _Live | _Lone, reason: str) -> None:
        if isinstance(live, _Lone):  # cancelled before its first step: nothing generated
            prompt, output, peak = live.ids, [], 1
        else:
            prompt, output, peak = live.prompt_ids, live.output_ids, live.peak_batch
        self._send(
            {
                "ok": True,
                "end": True,
                "id": live.rid,
                "finish_reason": reason,
                "prompt_tokens": len(prompt),
                "completion_tokens": len(output),
                "prompt_token_ids": [int(t) for t in prompt],
                "output_token_ids": output,
                "peak_batch": peak,
            }
        )

    def _error(self, rid: int, exc: Exception) -> None:
        from blindinfer.runtime.workers import _error_reply

        self._send(_error_reply(exc) | {"id": rid})


def _is_memory_failure(exc: BaseException) -> bool:
    from blindinfer.runtime.workers import _memory_failure

    return _memory_failure(exc)[0]
