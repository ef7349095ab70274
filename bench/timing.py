"""Timing helpers shared by the benchmarks: the same sampling, percentiles and interleaving
everywhere, so that numbers from different scripts are measured the same way.

Interleaving (blocks of A, then B, then A ...) is why ratios are trustworthy on a shared
machine: drift in load hits every variant equally.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed(fn: Callable[[], object], iterations: int, warmup: int = 2) -> list[float]:
    """`iterations` wall times of `fn()` in ms, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def interleaved(
    variants: dict[str, Callable[[], object]],
    iterations: int,
    block: int = 25,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Each variant's samples, taken in alternating blocks."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    while min(len(v) for v in results.values()) < iterations:
        for name, fn in variants.items():
            results[name] += timed(fn, block, warmup)
    return results


def side_by_side(
    first: Callable[[], object],
    second: Callable[[], object],
    iterations: int,
    block: int = 25,
    warmup: int = 2,
) -> tuple[list[float], list[float]]:
    """`interleaved` for two variants."""
    results = interleaved({"a": first, "b": second}, iterations, block, warmup)
    return results["a"], results["b"]


def machine() -> str:
    """One line naming the machine, for the header of every benchmark's output."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} vCPU {cpu}; Python {platform.python_version()}"
