"""WorkerPool: models run in sandboxed worker processes.

What is checked: outputs are bit-identical to onnxruntime in-process; a model that
allocates too much, runs too long or whose worker dies fails alone (its worker is replaced,
the rest of the pool keeps serving, models of the dead worker come back from `source`);
a full queue is refused; bad uploads are refused; a model's memory cost is measured.

Timings are never asserted tightly (shared CI machines): only that a timed-out request
returned, with the right error, within a generous margin.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from blindinfer.runtime.errors import (
    InferenceTimeoutError,
    InvalidModelError,
    MemoryLimitError,
    ModelLoadCrashedError,
    OverloadedError,
    WorkerCrashedError,
)
from blindinfer.runtime.session import ModelSession
from blindinfer.runtime.workers import ModelNotPlacedError, WorkerPool, WorkerStats
from support import hostile_models as hostile
from support.onnx_models import (
    dtype_identity_feed,
    dtype_identity_model,
    invalid_model_bytes,
    mlp_model,
    model_bytes,
    multi_io_feed,
    multi_io_model,
)

GIB = 1 << 30
MIB = 1 << 20
TIMEOUT_S = 2.0
MARGIN_S = 5.0  # a timed-out request must return within TIMEOUT_S + MARGIN_S

MLP = model_bytes(mlp_model())
MLP_X = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
SLOW_X = np.eye(256, dtype=np.float32)


class Store:
    """The caller's sealed store, as the pool sees it: bytes by key, and who asked."""

    def __init__(self) -> None:
        self.models: dict[str, bytes] = {}
        self.reads: list[str] = []

    def __call__(self, key: str) -> bytes:
        self.reads.append(key)
        return self.models[key]


PoolFactory = Callable[..., tuple[WorkerPool, Store]]


@pytest.fixture
def make_pool() -> Iterator[PoolFactory]:
    pools: list[WorkerPool] = []

    def make(**options: Any) -> tuple[WorkerPool, Store]:
        store = Store()
        settings: dict[str, Any] = {
            "workers": 2,
            "memory_limit_bytes": 3 * GIB // 2,
            "timeout_s": TIMEOUT_S,
            "intra_op_threads": 1,
        }
        settings.update(options)
        pool = WorkerPool(source=store, **settings)
        pools.append(pool)
        return pool, store

    yield make
    for pool in pools:
        pool.close()


def _load(pool: WorkerPool, store: Store, key: str, data: bytes) -> None:
    store.models[key] = data
    pool.validate_and_load(key, data)


def _worker_of(pool: WorkerPool, key: str) -> WorkerStats:
    return next(w for w in pool.stats() if key in w.models)


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Call(threading.Thread):
    """pool.run in a thread, keeping the outcome and how long it took."""

    def __init__(self, pool: WorkerPool, key: str, feed: dict[str, np.ndarray]) -> None:
        super().__init__(daemon=True)
        self.pool, self.key, self.feed = pool, key, feed
        self.error: BaseException | None = None
        self.elapsed_s = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.pool.run(self.key, self.feed)
        except BaseException as exc:
            self.error = exc
        self.elapsed_s = time.monotonic() - started


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------


def test_outputs_are_bit_identical_to_onnxruntime_in_process(make_pool: PoolFactory) -> None:
    pool, store = make_pool()
    cases = {
        "mlp": (MLP, {"x": MLP_X}),
        "multi_io": (model_bytes(multi_io_model()), multi_io_feed(batch=5)),
        "dtypes": (model_bytes(dtype_identity_model()), dtype_identity_feed()),
        "embedding": (
            hostile.embedding_output_model(),
            {"x": np.random.default_rng(1).standard_normal(hostile.EMBEDDING_SHAPE, np.float32)},
        ),
    }
    for key, (data, feed) in cases.items():
        _load(pool, store, key, data)
        local = ModelSession(data, intra_op_threads=1)
        assert pool.validate_and_load(key, data).signature == local.signature
        expected = local.run(feed)
        got = pool.run(key, feed)
        assert list(got) == list(expected)
        for name in expected:
            assert _identical(got[name], expected[name]), (key, name)
            assert got[name].flags.writeable
    # A requested subset of outputs, and non-contiguous, big-endian inputs.
    feed = {"x": MLP_X.astype(">f4")[:, ::-1].copy()[:, ::-1]}
    assert _identical(
        pool.run("mlp", feed, ["probabilities"])["probabilities"],
        ModelSession(MLP, intra_op_threads=1).run(feed)["probabilities"],
    )


def test_concurrent_requests_from_many_threads(make_pool: PoolFactory) -> None:
    pool, store = make_pool()
    _load(pool, store, "a", MLP)
    _load(pool, store, "b", model_bytes(mlp_model(seed=3)))
    expected = {
        key: ModelSession(store.models[key], intra_op_threads=1).run({"x": MLP_X})
        for key in ("a", "b")
    }
    mismatches: list[str] = []

    def client(key: str) -> None:
        for _ in range(40):
            got = pool.run(key, {"x": MLP_X})["probabilities"]
            if not _identical(got, expected[key]["probabilities"]):
                mismatches.append(key)

    threads = [threading.Thread(target=client, args=("ab"[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert mismatches == []
    assert all(w.pending == 0 and w.restarts == 0 for w in pool.stats())


def test_request_errors_are_the_in_process_ones(make_pool: PoolFactory) -> None:
    from blindinfer.errors import ProtocolError
    from blindinfer.runtime.errors import InvalidTensorError

    pool, store = make_pool(workers=1)
    _load(pool, store, "mlp", MLP)
    with pytest.raises(InvalidTensorError) as wrong_dtype:
        pool.run("mlp", {"x": MLP_X.astype(np.float64)})
    assert wrong_dtype.value.code == "wrong_datatype"
    with pytest.raises(InvalidTensorError) as wrong_output:
        pool.run("mlp", {"x": MLP_X}, ["nope"])
    assert wrong_output.value.code == "unknown_output"
    with pytest.raises(ProtocolError):
        pool.run("mlp", {"x": np.array([["a"]], dtype=object)})
    with pytest.raises(KeyError):
        pool.run("never-loaded", {"x": MLP_X})
    assert pool.stats()[0].restarts == 0  # refused requests do not cost a worker


@pytest.mark.parametrize("nbytes", [100 * GIB, 4 * GIB], ids=["100GiB", "4GiB"])
def test_huge_allocation_hits_the_memory_limit(make_pool: PoolFactory, nbytes: int) -> None:
    """100 GiB is refused by any kernel; 4 GiB would fit this host: the worker's limit is
    what stops it."""
    pool, store = make_pool()
    _load(pool, store, "mlp", MLP)
    _load(pool, store, "huge", hostile.huge_allocation_model(nbytes))
    before = _worker_of(pool, "huge")

    with pytest.raises(MemoryLimitError, match="more memory than a worker may use") as caught:
        pool.run("huge", {"x": np.ones(1, np.float32)})
    # without an arena onnxruntime no longer says how much it asked for; the limit is named
    assert "(1536 MiB); its worker was replaced" in str(caught.value)

    after = _worker_of(pool, "huge")
    assert after.pid != before.pid and after.restarts == before.restarts + 1
    assert after.alive
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape == (4, 10)
    # The model itself stays placed and fails the same way again, on a fresh worker.
    with pytest.raises(MemoryLimitError):
        pool.run("huge", {"x": np.ones(1, np.float32)})


def test_slow_model_times_out_and_the_pool_keeps_serving(make_pool: PoolFactory) -> None:
    pool, store = make_pool()
    _load(pool, store, "mlp", MLP)  # worker 0
    _load(pool, store, "slow", hostile.slow_model())  # worker 1: least memory
    _load(pool, store, "neighbour", model_bytes(mlp_model(seed=1)))  # worker 1: fewer bytes
    slow_worker = _worker_of(pool, "slow")
    assert _worker_of(pool, "mlp").index != slow_worker.index
    assert _worker_of(pool, "neighbour").index == slow_worker.index

    call = Call(pool, "slow", {"x": SLOW_X})
    call.start()
    _wait_for(lambda: _worker_of(pool, "slow").pending == 1, "the slow run to start")
    for _ in range(20):  # the other worker serves while the slow model burns its own
        pool.run("mlp", {"x": MLP_X})
    assert call.is_alive()
    call.join(TIMEOUT_S + MARGIN_S)
    assert not call.is_alive()

    assert isinstance(call.error, InferenceTimeoutError), call.error
    assert call.elapsed_s < TIMEOUT_S + MARGIN_S
    replaced = _worker_of(pool, "slow")
    assert replaced.pid != slow_worker.pid and replaced.restarts == 1
    assert replaced.loaded == ()  # reloaded lazily, not eagerly
    reads = len(store.reads)
    assert pool.run("neighbour", {"x": MLP_X})["probabilities"].shape == (4, 10)
    assert store.reads[reads:] == ["neighbour"]
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape == (4, 10)


@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL"])
def test_worker_killed_mid_run(make_pool: PoolFactory, signum: int) -> None:
    """No model reliably crashes onnxruntime, so the crash is simulated from outside."""
    pool, store = make_pool(workers=1, timeout_s=30.0)
    _load(pool, store, "mlp", MLP)
    _load(pool, store, "slow", hostile.slow_model())
    (worker,) = pool.stats()
    assert worker.pid is not None

    call = Call(pool, "slow", {"x": SLOW_X})
    call.start()
    _wait_for(lambda: pool.stats()[0].pending == 1, "the slow run to start")
    time.sleep(0.2)
    os.kill(worker.pid, signum)
    call.join(10.0)

    assert isinstance(call.error, WorkerCrashedError), call.error
    assert not isinstance(call.error, InferenceTimeoutError | ModelLoadCrashedError)
    assert pool.stats()[0].pid != worker.pid
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape == (4, 10)
    assert store.reads == ["mlp"]  # reloaded from the caller's store


def test_worker_that_died_idle_is_replaced_without_failing_a_request(
    make_pool: PoolFactory,
) -> None:
    pool, store = make_pool(workers=1)
    _load(pool, store, "mlp", MLP)
    (worker,) = pool.stats()
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)
    _wait_for(lambda: not pool.stats()[0].alive, "the worker to die")
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape == (4, 10)
    assert pool.stats()[0].alive and store.reads == ["mlp"]


def test_worker_killed_while_loading_refuses_the_upload(make_pool: PoolFactory) -> None:
    """SIGSTOP holds the worker mid-load deterministically; SIGKILL then 'crashes' it."""
    pool, store = make_pool(workers=1)
    (worker,) = pool.stats()
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGSTOP)
    outcome: list[BaseException] = []

    def upload() -> None:
        try:
            pool.validate_and_load("big", hostile.large_initializer_model(16 * MIB))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    _wait_for(lambda: pool.stats()[0].pending == 1, "the upload to start")
    time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)
    thread.join(10.0)

    (error,) = outcome
    assert isinstance(error, ModelLoadCrashedError)
    assert isinstance(error, InvalidModelError) and isinstance(error, WorkerCrashedError)
    assert str(error) == "the model crashed the runtime while loading"
    assert pool.stats()[0].models == ()  # the refused upload is not placed
    _load(pool, store, "mlp", MLP)
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape == (4, 10)


def test_a_full_queue_is_refused(make_pool: PoolFactory) -> None:
    pool, store = make_pool(workers=1, queue_limit=1)
    _load(pool, store, "mlp", MLP)
    _load(pool, store, "slow", hostile.slow_model())

    running = Call(pool, "slow", {"x": SLOW_X})
    running.start()
    _wait_for(lambda: pool.stats()[0].pending == 1, "the slow run to start")
    waiting = Call(pool, "mlp", {"x": MLP_X})
    waiting.start()
    _wait_for(lambda: pool.stats()[0].pending == 2, "a request to queue")

    with pytest.raises(OverloadedError) as caught:
        pool.run("mlp", {"x": MLP_X})
    assert caught.value.retry_after_s > 0
    assert caught.value.code == "overloaded"

    running.join(TIMEOUT_S + MARGIN_S)
    waiting.join(TIMEOUT_S + MARGIN_S)
    assert isinstance(running.error, InferenceTimeoutError)
    assert waiting.error is None  # served by the replacement worker, after a reload


def test_invalid_uploads_are_refused(make_pool: PoolFactory) -> None:
    pool, store = make_pool(workers=1)
    bad = {
        **invalid_model_bytes(),
        "corrupted": hostile.corrupted_model(),
        "external_data": hostile.external_data_model("../../etc/passwd"),
    }
    messages: dict[str, str] = {}
    for key, data in bad.items():
        with pytest.raises(InvalidModelError) as caught:
            pool.validate_and_load(key, data)
        assert not isinstance(caught.value, WorkerCrashedError), key
        messages[key] = str(caught.value)
    assert "protobuf" in messages["corrupted"]
    assert "external data" in messages["external_data"]
    assert "passwd" not in messages["external_data"]
    assert pool.stats()[0].models == ()
    assert pool.stats()[0].restarts == 0  # a refusal is an answer, not a crash
    _load(pool, store, "mlp", MLP)
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape == (4, 10)


def test_memory_cost_is_measured_and_drives_placement(make_pool: PoolFactory) -> None:
    pool, store = make_pool()
    store.models["big"] = hostile.large_initializer_model(64 * MIB)
    loaded = pool.validate_and_load("big", store.models["big"])
    print(f"64 MiB of weights cost {loaded.memory_bytes / MIB:.1f} MiB")
    assert 32 * MIB <= loaded.memory_bytes <= 512 * MIB
    big_worker = _worker_of(pool, "big")
    assert big_worker.memory_bytes == loaded.memory_bytes

    _load(pool, store, "mlp", MLP)
    _load(pool, store, "mlp2", model_bytes(mlp_model(seed=2)))
    small = pool.validate_and_load("mlp", MLP).memory_bytes
    assert 0 < small < loaded.memory_bytes
    for key in ("mlp", "mlp2"):  # both go where memory is free, not round-robin
        assert _worker_of(pool, key).index != big_worker.index

    pool.unload("big")
    assert _worker_of(pool, "mlp").memory_bytes > 0
    assert all("big" not in w.models and "big" not in w.loaded for w in pool.stats())
    with pytest.raises(KeyError):
        pool.run("big", {"x": np.ones(16 * MIB, np.float32)})


def test_close_stops_every_worker(make_pool: PoolFactory) -> None:
    pool, store = make_pool()
    _load(pool, store, "mlp", MLP)
    pids = [w.pid for w in pool.stats()]
    pool.close()
    assert all(not w.alive for w in pool.stats())
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError):
        pool.run("mlp", {"x": MLP_X})


def test_unloading_a_busy_model_does_not_wait_for_its_worker(make_pool: PoolFactory) -> None:
    """Issue 21, item 1: `unload` used to wait for the worker's current job (up to the
    inference timeout), and the registry called it under the lock every request needs.
    Now it returns at once; the run in progress finishes (here: is killed by the timeout),
    a run queued behind it ends in ModelNotPlacedError (a KeyError), and the session is
    dropped from the worker right after."""
    pool, store = make_pool(workers=1, timeout_s=30.0)
    _load(pool, store, "slow", hostile.slow_model())
    (worker,) = pool.stats()
    running = pool.submit("slow", {"x": SLOW_X})
    queued = pool.submit("slow", {"x": SLOW_X})
    _wait_for(lambda: pool.stats()[0].pending == 2, "both runs to queue")
    time.sleep(0.2)  # the first one is in onnxruntime now

    started = time.monotonic()
    pool.unload("slow")
    assert time.monotonic() - started < 1.0
    assert pool.stats()[0].models == () and pool.stats()[0].loaded == ()
    with pytest.raises(KeyError):  # no new run reaches it
        pool.submit("slow", {"x": SLOW_X})

    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)  # end the endless run now rather than in 30 s
    with pytest.raises(WorkerCrashedError):
        running.result(10.0)
    with pytest.raises(ModelNotPlacedError):
        queued.result(10.0)
    _load(pool, store, "mlp", MLP)
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape == (4, 10)
    assert pool.stats()[0].pending == 0


def test_an_unload_is_carried_out_after_the_current_job(make_pool: PoolFactory) -> None:
    """The session of a model unloaded while its worker runs another one leaves the worker
    process once that job ends (its memory must not stay held)."""
    pool, store = make_pool(workers=1, timeout_s=TIMEOUT_S)
    _load(pool, store, "slow", hostile.slow_model())
    _load(pool, store, "mlp", MLP)
    running = pool.submit("slow", {"x": SLOW_X})
    _wait_for(lambda: pool.stats()[0].pending == 1, "the slow run to start")
    pool.unload("mlp")
    assert pool.stats()[0].models == ("slow",)
    with pytest.raises(InferenceTimeoutError):
        running.result(TIMEOUT_S + MARGIN_S)
    _load(pool, store, "mlp", MLP)  # the same key again, on the replaced worker: it runs
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape == (4, 10)
    pool.unload("mlp")
    _wait_for(lambda: pool.stats()[0].pending == 0, "the unload to be carried out")
    assert pool.stats()[0].loaded == ()


def test_queued_runs_hold_no_threads(make_pool: PoolFactory) -> None:
    """Issue 21, item 4: forty runs waiting for one busy worker hold forty queue entries,
    not forty threads of the caller; the other worker serves meanwhile."""
    pool, store = make_pool(workers=2, timeout_s=TIMEOUT_S, queue_limit=64)
    _load(pool, store, "slow", hostile.slow_model())
    _load(pool, store, "mlp", MLP)
    assert _worker_of(pool, "slow").index != _worker_of(pool, "mlp").index
    threads = threading.active_count()
    futures = [pool.submit("slow", {"x": SLOW_X}) for _ in range(40)]
    assert _worker_of(pool, "slow").pending == 40
    assert threading.active_count() <= threads + 2  # the two workers' queue threads
    started = time.monotonic()
    assert pool.run("mlp", {"x": MLP_X})["probabilities"].shape == (4, 10)
    assert time.monotonic() - started < 2.0
    pool.close()  # cancels what is still queued
    assert futures[-1].cancelled()
