"""Concurrent generations on one model share the worker's decoding steps (WorkerPool batching).

Real worker processes, the real tiny Llama (tests/support/tiny_llm.py) and the in-process
GenerativeSession on the same folder as the reference. No timing is asserted: that requests
shared steps is read from the worker's own count (`WorkerStats.peak_batch`, the most
generations in one og Engine step). To make requests arrive together deterministically, a
"holder" generation's text callback (which runs on the pool's relay thread) blocks until the
others were submitted: they wait in the batch, and the relay sends them in one frame.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blindinfer.client.model_folder import ModelFolder
from blindinfer.protocol.generation import SamplingParams
from blindinfer.runtime.errors import InferenceTimeoutError, WorkerCrashedError
from blindinfer.runtime.generation_mux import GenerationMux
from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions
from blindinfer.runtime.workers import WorkerPool
from support.onnx_models import model_bytes, multi_io_feed, multi_io_model, multi_io_reference

MESSAGES = [{"role": "user", "content": "hello there"}]
OTHER = [{"role": "user", "content": "Seal the model."}]
GREEDY = SamplingParams(max_tokens=48, temperature=0.0, stop=())
SEEDED = SamplingParams(max_tokens=48, temperature=0.9, top_p=0.95, top_k=50, seed=7, stop=())
WAIT_S = 60


@pytest.fixture(scope="module")
def archive(tiny_llm: tuple[Path, Path]) -> bytes:
    return b"".join(ModelFolder.open(tiny_llm[1]).chunks())


@pytest.fixture(scope="module")
def session(tiny_llm: tuple[Path, Path]) -> GenerativeSession:
    return GenerativeSession(tiny_llm[1], RuntimeOptions(intra_op_threads=1))


def _pool(archive: bytes, **kwargs: Any) -> WorkerPool:
    sources = {"m": archive, "t": model_bytes(multi_io_model())}
    options: dict[str, Any] = {
        "workers": 1,
        "memory_limit_bytes": 4 << 30,
        "timeout_s": 60,
        "source": sources.__getitem__,
        "intra_op_threads": 1,
        "max_new_tokens": 200,
    }
    pool = WorkerPool(**(options | kwargs))
    pool.load("m", archive, "generative")
    return pool


@pytest.fixture
def pool(archive: bytes) -> Iterator[WorkerPool]:
    with _pool(archive) as pool:
        yield pool


def _reference(session: GenerativeSession, messages: Any, params: SamplingParams) -> list[int]:
    ids = session.chat_prompt_ids(messages)
    with session.generate(ids, params) as generation:
        return [t.token_id for t in generation]


class Stream:
    """One submitted generation: its pieces, its cancel event and its future."""

    def __init__(
        self,
        pool: WorkerPool,
        params: SamplingParams,
        messages: Any = MESSAGES,
        on_piece: Callable[[Stream], None] | None = None,
    ) -> None:
        self.pieces: list[str] = []
        self.cancel = threading.Event()
        self._on_piece = on_piece
        request = {"prompt": {"messages": messages}, "params": params.as_dict()}
        self.future: Future[dict[str, Any]] = pool.submit_generate(
            "m", request, self._emit, self.cancel
        )

    def _emit(self, text: str) -> None:
        self.pieces.append(text)
        if self._on_piece is not None:
            self._on_piece(self)

    def result(self) -> dict[str, Any]:
        return self.future.result(WAIT_S)


class Holder:
    """A generation whose first piece blocks the relay until `release()`: what is submitted
    meanwhile waits in the batch and is sent to the worker in one frame."""

    def __init__(
        self,
        pool: WorkerPool,
        params: SamplingParams = GREEDY,
        at_first: Callable[[], None] = lambda: None,
    ) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()
        self._at_first = at_first
        self.stream = Stream(pool, params, on_piece=self._first)
        assert self.entered.wait(WAIT_S), "the holder never produced text"

    def _first(self, stream: Stream) -> None:
        if not self.entered.is_set():
            self._at_first()
            self.entered.set()
            assert self._release.wait(WAIT_S)

    def release(self) -> None:
        self._release.set()


def test_concurrent_greedy_generations_share_steps_and_equal_in_process(
    pool: WorkerPool, session: GenerativeSession
) -> None:
    expected = {
        "a": _reference(session, MESSAGES, GREEDY),
        "b": _reference(session, OTHER, GREEDY),
    }
    holder = Holder(pool)
    streams = [Stream(pool, GREEDY, MESSAGES if i % 2 == 0 else OTHER) for i in range(4)]
    holder.release()
    for i, stream in enumerate(streams):
        final = stream.result()
        ids = expected["a" if i % 2 == 0 else "b"]
        assert final["output_token_ids"] == ids
        assert final["completion_tokens"] == len(ids)
        assert "".join(stream.pieces) == session.decode(ids)
    assert holder.stream.result()["output_token_ids"] == expected["a"]
    stats = pool.stats()[0]
    assert stats.peak_batch == 4  # the four ran in one Engine step, not one after another
    assert stats.generating == 0 and stats.pending == 0 and stats.restarts == 0


def test_one_cancelled_mid_batch_leaves_the_others_intact(
    pool: WorkerPool, session: GenerativeSession
) -> None:
    expected = _reference(session, MESSAGES, GREEDY)

    def leave_after_two(stream: Stream) -> None:
        if len(stream.pieces) == 2:
            stream.cancel.set()  # its client goes away mid-stream

    holder = Holder(pool)
    cancelled = Stream(pool, GREEDY, on_piece=leave_after_two)
    others = [Stream(pool, GREEDY) for _ in range(3)]
    holder.release()
    final = cancelled.result()
    assert final["finish_reason"] == "cancelled"
    assert 2 <= final["completion_tokens"] < len(expected)
    assert final["output_token_ids"] == expected[: final["completion_tokens"]]
    for stream in others:
        assert stream.result()["output_token_ids"] == expected
    assert pool.stats()[0].peak_batch == 4
    # the worker is in step and free after the batch
    assert Stream(pool, GREEDY).result()["output_token_ids"] == expected


def test_cancel_frees_the_request_in_the_engine(session: GenerativeSession) -> None:
    """In-process: a cancelled request leaves the Engine's batch at once (its KV rows are
    released at the Engine's next step), and the others' tokens are unchanged."""
    expected = _reference(session, MESSAGES, GREEDY)
    frames: list[dict[str, Any]] = []
    mux = GenerationMux(frames.append)
    for rid in range(3):
        mux.start(session, "m", {"id": rid, "prompt": {"messages": MESSAGES}, **_wire(GREEDY)})
    mux.step()
    mux.step()
    mux.cancel(1)
    assert mux.live == 2
    (group,) = mux._groups["m"]
    assert 1 not in group.members and len(group.batcher._live) == 2
    while mux.active:
        mux.step()
    finals = {f["id"]: f for f in frames if f.get("end")}
    assert finals[1]["finish_reason"] == "cancelled"
    assert finals[0]["output_token_ids"] == finals[2]["output_token_ids"] == expected
    assert not group.batcher.pending() and mux.live == 0


def _wire(params: SamplingParams) -> dict[str, Any]:
    return {"params": params.as_dict()}


def test_a_seeded_request_in_a_batch_is_reproducible(
    pool: WorkerPool, session: GenerativeSession
) -> None:
    alone = _reference(session, MESSAGES, SEEDED)
    greedy = _reference(session, MESSAGES, GREEDY)
    holder = Holder(pool)
    seeded = Stream(pool, SEEDED)
    batch = [Stream(pool, GREEDY) for _ in range(3)]
    holder.release()
    assert seeded.result()["output_token_ids"] == alone  # the same seed, the same tokens
    for stream in batch:
        assert stream.result()["output_token_ids"] == greedy
    assert pool.stats()[0].peak_batch == 3  # the seeded one steps in turn, not in the Engine
    assert Stream(pool, SEEDED).result()["output_token_ids"] == alone


def test_a_worker_crash_mid_batch_fails_every_request_and_the_pool_recovers(
    pool: WorkerPool, session: GenerativeSession
) -> None:
    long = SamplingParams(max_tokens=180, temperature=0.0, stop=())
    assert len(_reference(session, MESSAGES, long)) == 180  # long enough to be in flight
    pid = pool.stats()[0].pid
    assert pid is not None
    killed = threading.Event()

    def kill_at_first_piece(stream: Stream) -> None:
        if not killed.is_set():
            killed.set()
            os.kill(pid, signal.SIGKILL)  # the model crashes the worker mid-batch

    holder = Holder(pool)
    streams = [Stream(pool, long, on_piece=kill_at_first_piece)]
    streams += [Stream(pool, long) for _ in range(3)]
    holder.release()
    for stream in streams:
        with pytest.raises(WorkerCrashedError):
            stream.result()
    stats = pool.stats()[0]
    assert stats.restarts == 1 and stats.pending == 0 and stats.generating == 0
    # replaced once; the model is reloaded from its source on the next request
    assert Stream(pool, GREEDY).result()["output_token_ids"] == _reference(
        session, MESSAGES, GREEDY
    )
    assert pool.stats()[0].restarts == 1


def test_a_tensor_run_on_the_same_worker_completes_during_a_batch(archive: bytes) -> None:
    with _pool(archive) as pool:
        pool.load("t", model_bytes(multi_io_model()))
        feed = multi_io_feed(batch=3)
        holder = Holder(pool)
        joined = Stream(pool, GREEDY)  # joins the running batch
        run = pool.submit("t", feed)  # waits for the batch to drain; closes it to newcomers
        later = Stream(pool, GREEDY)  # queued after the run: not joining the batch
        holder.release()
        outputs = run.result(WAIT_S)
        expected = multi_io_reference(feed)
        np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-5)
        assert np.array_equal(outputs["masked_ids"], expected["masked_ids"])
        tokens = holder.stream.result()["output_token_ids"]
        assert joined.result()["output_token_ids"] == tokens
        assert later.result()["output_token_ids"] == tokens
        assert pool.stats()[0].pending == 0


def test_max_batch_bounds_the_generations_running_at_once(
    archive: bytes, session: GenerativeSession
) -> None:
    expected = _reference(session, MESSAGES, GREEDY)
    running: list[int] = []
    with _pool(archive, max_batch=2) as pool:

        def watch(stream: Stream) -> None:  # on the relay thread: a consistent view
            running.append(pool.stats()[0].generating)

        holder = Holder(pool)
        streams = [Stream(pool, GREEDY, on_piece=watch) for _ in range(5)]
        holder.release()
        assert all(s.result()["output_token_ids"] == expected for s in streams)
        stats = pool.stats()[0]
        assert max(running) <= 2 and 1 <= stats.peak_batch <= 2 and stats.pending == 0


def test_a_request_past_its_deadline_fails_alone(
    archive: bytes, session: GenerativeSession
) -> None:
    """`timeout_s` bounds each generation: the late one is cancelled in the worker and fails
    with InferenceTimeoutError; the worker answers, so it is kept and the others go on."""
    long = SamplingParams(max_tokens=180, temperature=0.0, stop=())
    with _pool(archive, timeout_s=2.0) as pool:
        pid = pool.stats()[0].pid
        assert pid is not None
        # the worker pauses mid-generation (a slow step) until past the holder's deadline
        holder = Holder(pool, long, at_first=lambda: os.kill(pid, signal.SIGSTOP))
        joined = Stream(pool, GREEDY)
        threading.Event().wait(2.5)
        os.kill(pid, signal.SIGCONT)
        holder.release()
        with pytest.raises(InferenceTimeoutError):
            holder.stream.result()
        assert joined.result()["output_token_ids"] == _reference(session, MESSAGES, GREEDY)
        stats = pool.stats()[0]
        assert stats.restarts == 0 and stats.pending == 0


def test_a_worker_stuck_mid_batch_is_replaced(archive: bytes, session: GenerativeSession) -> None:
    """A worker that stops producing anything (a step that never ends) fails every request
    running on it with InferenceTimeoutError and is replaced."""
    long = SamplingParams(max_tokens=180, temperature=0.0, stop=())
    with _pool(archive, timeout_s=2.0) as pool:
        pid = pool.stats()[0].pid
        assert pid is not None
        holder = Holder(pool, long, at_first=lambda: os.kill(pid, signal.SIGSTOP))
        joined = [Stream(pool, long) for _ in range(2)]
        holder.release()
        for stream in [holder.stream, *joined]:
            with pytest.raises(InferenceTimeoutError):
                stream.result()
        assert pool.stats()[0].restarts == 1
        assert Stream(pool, GREEDY).result()["output_token_ids"] == _reference(
            session, MESSAGES, GREEDY
        )


@pytest.mark.parametrize("several", [False, True])
def test_end_of_sequence_is_a_token_in_a_batch_as_alone(
    session: GenerativeSession, tiny_llm: tuple[Path, Path], tmp_path: Path, several: bool
) -> None:
    """og's Engine ends a turn at end of sequence without a token event, where og.Generator
    yields the token: the batch delivers it too (same ids and counts for usage and
    receipts). With several end-of-sequence ids the Engine cannot say which one it met, so
    those models' requests run on their own generators."""
    import json
    import shutil

    greedy = _reference(session, MESSAGES, GREEDY)
    folder = tmp_path / "eos"
    shutil.copytree(tiny_llm[1], folder)
    config = json.loads((folder / "genai_config.json").read_text())
    # a token the model generates greedily, made its end of sequence
    config["model"]["eos_token_id"] = [greedy[3], greedy[5]] if several else greedy[3]
    (folder / "genai_config.json").write_text(json.dumps(config))
    eos_session = GenerativeSession(folder, RuntimeOptions(intra_op_threads=1))
    expected = _reference(eos_session, MESSAGES, GREEDY)
    assert expected == greedy[:4]
    frames: list[dict[str, Any]] = []
    mux = GenerationMux(frames.append)
    for rid in range(2):
        mux.start(eos_session, "m", {"id": rid, "prompt": {"messages": MESSAGES}, **_wire(GREEDY)})
    assert len(mux._solo) == (2 if several else 0)
    while mux.active:
        mux.step()
    for final in (f for f in frames if f.get("end")):
        assert final["output_token_ids"] == expected
        assert final["completion_tokens"] == 4 and final["finish_reason"] == "stop"


def test_closing_the_pool_ends_every_generation(archive: bytes) -> None:
    """Nothing waits forever: running, joined and queued generations all end when the pool
    closes (the registry's streams then end with an error, not a hang)."""
    pool = _pool(archive)
    pool.load("t", model_bytes(multi_io_model()))
    holder = Holder(pool)
    joined = Stream(pool, GREEDY)
    run = pool.submit("t", multi_io_feed(batch=2))
    queued = Stream(pool, GREEDY)  # behind the run: a batch of its own, not started
    pool.close()
    holder.release()
    for future in (holder.stream.future, joined.future, queued.future, run):
        assert future.cancelled() or future.exception(WAIT_S) is not None


def test_a_lone_request_runs_on_its_own_generator_and_a_frame_of_four_batches(
    session: GenerativeSession,
) -> None:
    """A request alone at its first step takes og.Generator (no Engine scheduling before its
    first token); four in one frame still share each Engine step, as do two that arrive in
    separate frames before a step; one arriving while others run joins an Engine. Driven
    through the worker's own frame handler (`_start_generations`), in process."""
    from blindinfer.runtime.workers import _start_generations

    expected = _reference(session, MESSAGES, GREEDY)
    frames: list[dict[str, Any]] = []
    mux = GenerationMux(frames.append)
    sessions = {"m": session}

    def frame(*rids: int) -> None:
        requests = [
            {"id": rid, "key": "m", "prompt": {"messages": MESSAGES}, **_wire(GREEDY)}
            for rid in rids
        ]
        conn: Any = None  # only used to report a refused request; none is refused here
        assert _start_generations(mux, sessions, requests, conn)

    def drain() -> None:
        while mux.active:
            mux.step()

    frame(0)
    assert mux.live == 1 and mux.active and mux.solo_started == 0  # decided at its step
    mux.step()
    assert mux.solo_started == 1 and 0 in mux._solo and not mux._groups
    frame(1)  # joins while 0 runs: an Engine
    assert mux.solo_started == 1 and 1 in mux._groups["m"][0].members
    drain()
    frame(2, 3, 4, 5)
    assert mux.solo_started == 1 and len(mux._groups["m"][0].members) == 4  # a warm Engine
    drain()
    frame(6)
    frame(7)  # read before 6's first step: they share the Engine
    assert mux.solo_started == 1 and set(mux._groups["m"][0].members) == {6, 7}
    drain()
    frame(8)
    mux.cancel(8)  # cancelled before its first step: a final frame, nothing generated
    assert not mux.active and mux.live == 0 and mux.solo_started == 1
    finals = {f["id"]: f for f in frames if f.get("end")}
    assert sorted(finals) == list(range(9))
    assert finals[8]["finish_reason"] == "cancelled" and finals[8]["output_token_ids"] == []
    for rid in range(8):
        final = finals[rid]
        assert final["output_token_ids"] == expected and final["finish_reason"] == "length"
    assert finals[0]["peak_batch"] == finals[1]["peak_batch"] == 1
    assert {finals[rid]["peak_batch"] for rid in range(2, 6)} == {4}
    assert finals[6]["peak_batch"] == finals[7]["peak_batch"] == 2
