"""What isolation costs: run() through the WorkerPool vs ModelSession in-process.

For the MLP 64-256-10 (batch 1) and a model with a 1x128x384 float32 input and output (the
size of a transformer's hidden states), prints median and p99 of both and their ratio and
difference (the difference is the per-request cost of the process boundary: framing, two
pipe round trips, waking the worker). Also times a bare round trip of a 1x128x384 tensor
to an echo process, with the pool's framing and with pickle, to show what the framing saves.

Both sides use one intra-op thread so that only the boundary differs. Run:
`.venv/bin/python bench/bench_workers.py` (`--quick` for fewer iterations). Not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from timing import percentile, side_by_side, timed  # noqa: E402

from blindinfer.runtime.session import ModelSession  # noqa: E402
from blindinfer.runtime.workers import (  # noqa: E402
    WorkerPool,
    _recv_header,
    _recv_tensors,
    _send,
)
from support import hostile_models, onnx_models  # noqa: E402


def report(name: str, local: list[float], pooled: list[float]) -> None:
    lm, pm = statistics.median(local), statistics.median(pooled)
    print(
        f"{name:<24} in-process {lm:7.3f} / {percentile(local, 99):7.3f} ms   "
        f"pool {pm:7.3f} / {percentile(pooled, 99):7.3f} ms   "
        f"ratio {pm / lm:6.1f}   +{(pm - lm) * 1000:6.0f} us"
    )


def _echo(conn: Connection, framed: bool) -> None:
    """Returns every message as it came: the pool's framing, or pickle."""
    while True:
        try:
            if framed:
                header = _recv_header(conn)
                _send(conn, {}, _recv_tensors(conn, header, 1 << 30, None))
            else:
                conn.send(conn.recv())
        except EOFError:
            return


def echo_round_trip(array: np.ndarray[Any, Any], framed: bool, iterations: int) -> list[float]:
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    process = context.Process(target=_echo, args=(theirs, framed), daemon=True)
    process.start()
    theirs.close()

    def framed_trip() -> object:
        _send(mine, {}, {"y": array})
        return _recv_tensors(mine, _recv_header(mine), 1 << 30, None)

    def pickled_trip() -> object:
        mine.send({"y": array})
        return mine.recv()

    samples = timed(framed_trip if framed else pickled_trip, iterations, warmup=20)
    mine.close()
    process.join(5)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    iterations = 300 if parser.parse_args().quick else 2000

    rng = np.random.default_rng(0)
    cases = {
        "MLP 64-256-10, batch 1": (
            onnx_models.model_bytes(onnx_models.mlp_model()),
            {"x": rng.standard_normal((1, 64)).astype(np.float32)},
        ),
        "1x128x384 in and out": (
            hostile_models.embedding_output_model(),
            {"x": rng.standard_normal(hostile_models.EMBEDDING_SHAPE).astype(np.float32)},
        ),
    }
    with WorkerPool(
        workers=1,
        memory_limit_bytes=2 << 30,
        timeout_s=10.0,
        source=lambda key: cases[key][0],
        intra_op_threads=1,
    ) as pool:
        for name, (data, feed) in cases.items():
            pool.load(name, data)
            session = ModelSession(data, intra_op_threads=1)
            local, pooled = side_by_side(
                lambda s=session, f=feed: s.run(f),
                lambda n=name, f=feed: pool.run(n, f),
                iterations,
                block=50,
            )
            report(name, local, pooled)

    embedding = rng.standard_normal(hostile_models.EMBEDDING_SHAPE).astype(np.float32)
    for framed in (True, False):
        samples = echo_round_trip(embedding, framed, iterations)
        label = "header + raw frames" if framed else "pickle"
        median_us = statistics.median(samples) * 1000
        p99_us = percentile(samples, 99) * 1000
        print(f"echo round trip of 1x128x384 FP32 ({label}): {median_us:.0f} / {p99_us:.0f} us")


if __name__ == "__main__":  # spawned workers import __main__: keep the work behind this guard
    main()
