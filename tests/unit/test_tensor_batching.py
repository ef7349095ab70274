"""Dynamic batching of tensor runs (WorkerPool(max_tensor_batch=N), runtime/tensor_batch.py)
against real onnxruntime sessions in real workers.

A batch is forced deterministically: the test holds the worker's gate while it queues the
runs, so the first queued run finds the others already waiting when it gets its turn.
Whether runs were batched together is proven by a model whose every output row is the sum
over all rows of its input (ReduceSum over axis 0, broadcast back): a batch changes that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from blindinfer.cli.main import _config, build_parser
from blindinfer.errors import UsageError
from blindinfer.runtime.errors import InvalidTensorError
from blindinfer.runtime.signature import ModelSignature, TensorSpec
from blindinfer.runtime.tensor_batch import batch_outputs, split
from blindinfer.runtime.workers import WorkerPool
from blindinfer.server.config import ServerConfig
from support.onnx_models import IR_VERSION, OPSET, mlp_model, mlp_reference, model_bytes

GIB = 1 << 30
Array = np.ndarray[Any, Any]


def _finish(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model_bytes(model)


def _row_sum(batch: str | int = "batch", out: str | int = "batch") -> bytes:
    """y[i] = x[i] * 0 + sum over all rows of x: every row depends on every row."""
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
        helper.make_node("Mul", ["x", "zero"], ["z"]),
        helper.make_node("Add", ["z", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "row_sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [out, 4])],
        [zero, axes],
    )
    return _finish(graph)


def _sum_only() -> bytes:
    """ReduceSum(x, 0) alone: axis 0 of the output is declared dynamic but is always 1, so
    a batch's output does not split by rows and the runs must be done again alone."""
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "sum_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["one", 4])],
        [axes],
    )
    return _finish(graph)


def _int_identity() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "int_identity",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", 3])],
    )
    return _finish(graph)


def _gather() -> bytes:
    """table[idx]: an index out of range fails the run (in onnxruntime, at run time)."""
    table = numpy_helper.from_array(np.arange(30, dtype=np.float32).reshape(10, 3), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [table],
    )
    return _finish(graph)


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    models: dict[str, bytes] = {}
    pool = WorkerPool(
        workers=1,
        memory_limit_bytes=3 * GIB // 2,
        timeout_s=10.0,
        intra_op_threads=1,
        source=models.__getitem__,
        max_tensor_batch=8,
    )
    pool.models = models  # type: ignore[attr-defined]
    with pool:
        yield pool


def _load(pool: WorkerPool, key: str, data: bytes) -> None:
    pool.models[key] = data  # type: ignore[attr-defined]
    pool.validate_and_load(key, data)


def _queued(
    pool: WorkerPool, key: str, feeds: Sequence[tuple[str | None, dict[str, Array]]]
) -> list[Future[dict[str, Array]]]:
    """Submits every feed (tenant, inputs) while the worker is held, then lets it go: the
    first run's turn finds all the others queued."""
    worker = pool._workers[0]
    worker.gate.acquire()
    try:
        futures = [pool.submit(key, feed, tenant=tenant) for tenant, feed in feeds]
    finally:
        worker.gate.release()
    return futures


def _rows(seed: int, n: int) -> Array:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_same_tenant_runs_are_batched(pool: WorkerPool) -> None:
    _load(pool, "sum", _row_sum())
    feeds = [_rows(i, i + 1) for i in range(3)]
    futures = _queued(pool, "sum", [("a", {"x": x}) for x in feeds])
    total = np.concatenate(feeds).sum(axis=0)
    for future, x in zip(futures, feeds, strict=True):
        y = future.result(timeout=30)["y"]
        assert y.shape == x.shape
        np.testing.assert_allclose(y, np.broadcast_to(total, x.shape), rtol=1e-5)
        assert y.base is None or y.base.shape == y.shape  # a copy, no view of the batch


def test_different_tenants_are_never_batched(pool: WorkerPool) -> None:
    _load(pool, "sum", _row_sum())
    feeds = [("a", _rows(1, 2)), ("b", _rows(2, 3)), ("a", _rows(3, 1)), (None, _rows(4, 2))]
    futures = _queued(pool, "sum", [(tenant, {"x": x}) for tenant, x in feeds])
    a_total = feeds[0][1].sum(axis=0) + feeds[2][1].sum(axis=0)  # a's two runs: one batch
    expected = [a_total, feeds[1][1].sum(axis=0), a_total, feeds[3][1].sum(axis=0)]
    for future, (_, x), want in zip(futures, feeds, expected, strict=True):
        np.testing.assert_allclose(
            future.result(timeout=30)["y"], np.broadcast_to(want, x.shape), rtol=1e-5
        )


def test_batched_mlp_equals_unbatched(pool: WorkerPool) -> None:
    _load(pool, "mlp", model_bytes(mlp_model()))
    feeds = [
        np.random.default_rng(i).standard_normal((i % 3 + 1, 64)).astype(np.float32)
        for i in range(8)
    ]
    alone = [pool.run("mlp", {"x": x})["probabilities"] for x in feeds]
    futures = _queued(pool, "mlp", [("a", {"x": x}) for x in feeds])
    for future, want, x in zip(futures, alone, feeds, strict=True):
        got = future.result(timeout=30)["probabilities"]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-6)


def test_batched_integers_are_exact(pool: WorkerPool) -> None:
    _load(pool, "ids", _int_identity())
    feeds = [np.arange(3 * (i + 1), dtype=np.int64).reshape(i + 1, 3) + 100 * i for i in range(5)]
    futures = _queued(pool, "ids", [("a", {"x": x}) for x in feeds])
    for future, x in zip(futures, feeds, strict=True):
        y = future.result(timeout=30)["y"]
        assert y.dtype == x.dtype and y.shape == x.shape
        assert y.tobytes() == x.tobytes()


def test_fixed_batch_dimension_is_not_batched(pool: WorkerPool) -> None:
    _load(pool, "fixed", _row_sum(batch=2, out=2))
    feeds = [_rows(i, 2) for i in range(3)]
    futures = _queued(pool, "fixed", [("a", {"x": x}) for x in feeds])
    for future, x in zip(futures, feeds, strict=True):
        want = np.broadcast_to(x.sum(axis=0), x.shape)
        np.testing.assert_allclose(future.result(timeout=30)["y"], want, rtol=1e-5)


def test_outputs_that_do_not_split_by_rows_run_alone(pool: WorkerPool) -> None:
    _load(pool, "sum1", _sum_only())
    feeds = [_rows(i, i + 2) for i in range(3)]
    futures = _queued(pool, "sum1", [("a", {"x": x}) for x in feeds])
    for future, x in zip(futures, feeds, strict=True):
        y = future.result(timeout=30)["y"]
        np.testing.assert_allclose(y, x.sum(axis=0, keepdims=True), rtol=1e-5)


def test_a_failing_request_fails_alone(pool: WorkerPool) -> None:
    _load(pool, "gather", _gather())
    feeds = [np.array([1, 2]), np.array([99]), np.array([0]), np.array([9, 9, 3])]
    futures = _queued(pool, "gather", [("a", {"idx": idx.astype(np.int64)}) for idx in feeds])
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    for i in (0, 2, 3):
        assert futures[i].result(timeout=30)["y"].tobytes() == table[feeds[i]].tobytes()
    with pytest.raises(InvalidTensorError):
        futures[1].result(timeout=30)
    # the worker serves the next runs as before
    assert pool.run("gather", {"idx": np.array([4], np.int64)})["y"].tolist() == [[12, 13, 14]]


def test_max_tensor_batch_is_bounded() -> None:
    for bad in (0, 1025):
        with pytest.raises(ValueError, match="max_tensor_batch"):
            WorkerPool(
                workers=1,
                memory_limit_bytes=GIB,
                timeout_s=1.0,
                source=lambda _: b"",
                max_tensor_batch=bad,
            )


# -- the pure parts ------------------------------------------------------------------------


def test_batch_outputs_needs_every_input_dynamic() -> None:
    def sig(inputs: list[tuple[int, ...]], outputs: list[tuple[int, ...]]) -> ModelSignature:
        return ModelSignature(
            inputs=tuple(TensorSpec(f"i{n}", "FP32", s) for n, s in enumerate(inputs)),
            outputs=tuple(TensorSpec(f"o{n}", "FP32", s) for n, s in enumerate(outputs)),
        )

    assert batch_outputs(sig([(-1, 4), (-1,)], [(-1, 2), (3,), ()])) == frozenset({"o0"})
    assert batch_outputs(sig([(-1, 4), (2,)], [(-1, 2)])) is None
    assert batch_outputs(sig([()], [(-1,)])) is None
    assert batch_outputs(sig([], [(-1,)])) is None


def test_split_copies_rows_and_refuses_anything_else() -> None:
    y = np.arange(12, dtype=np.float32).reshape(6, 2)
    parts = split({"y": y}, [1, 2, 3], frozenset({"y"}))
    assert parts is not None
    assert [p["y"].tolist() for p in parts] == [
        [[0, 1]],
        [[2, 3], [4, 5]],
        [[6, 7], [8, 9], [10, 11]],
    ]
    assert all(p["y"].base is None for p in parts)  # copies
    assert split({"y": y}, [1, 2], None) is None  # rows do not add up
    assert split({"y": y}, [3, 4], None) is None
    assert split({"y": np.float32(1.0) * np.ones(())}, [1], None) is None  # no axis 0
    assert split({"y": y, "z": y}, [6], frozenset({"y"})) is None  # an undeclared output


def test_run_async_batches_what_is_queued(pool: WorkerPool) -> None:
    _load(pool, "sum", _row_sum())
    feeds = [_rows(i, 2) for i in range(4)]
    worker = pool._workers[0]

    async def main() -> list[dict[str, Array]]:
        worker.gate.acquire()  # busy: every run below queues
        try:
            tasks = [
                asyncio.ensure_future(pool.run_async("sum", {"x": x}, tenant="a")) for x in feeds
            ]
            while worker.pending < len(feeds):
                await asyncio.sleep(0.001)
        finally:
            worker.gate.release()
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(main())
    total = np.concatenate(feeds).sum(axis=0)
    for result, x in zip(results, feeds, strict=True):
        np.testing.assert_allclose(result["y"], np.broadcast_to(total, x.shape), rtol=1e-5)


def test_close_resolves_every_queued_run(pool: WorkerPool) -> None:
    _load(pool, "sum", _row_sum())
    worker = pool._workers[0]
    worker.gate.acquire()
    try:
        futures = [pool.submit("sum", {"x": _rows(i, 1)}, tenant="a") for i in range(3)]
        _wait_until(lambda: futures[0].running())  # the first job waits for the gate
        pool.close()
    finally:
        worker.gate.release()
    # not concurrent.futures.wait: a future cancelled before anyone waits counts as done
    # for `done()` but not for `wait()` until an executor notifies it, so it would sit out
    # its whole timeout
    _wait_until(lambda: all(future.done() for future in futures))
    assert not futures[0].cancelled() and futures[0].exception() is not None
    assert all(future.cancelled() for future in futures[1:])


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_serve_option_is_parsed_bounded_and_not_measured() -> None:
    def config(*extra: str) -> ServerConfig:
        built = _config(build_parser().parse_args(["serve", "--simulation", *extra]))
        assert isinstance(built, ServerConfig)
        return built

    assert config().max_tensor_batch == 1
    assert config("--max-tensor-batch", "8").max_tensor_batch == 8
    for bad in ("0", "1025"):
        with pytest.raises(UsageError, match="--max-tensor-batch"):
            config("--max-tensor-batch", bad)
    # a client's policy (the measurement) does not change with it
    assert config("--max-tensor-batch", "8").security_relevant() == config().security_relevant()
