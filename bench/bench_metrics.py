"""What recording a request's metrics costs: the hand-written registry that
`blindinfer.server.metrics` used to be (read from git, commit `--old`) against the
prometheus_client one it is now, through the same recording calls the middleware makes per
request (in-flight gauge up and down, the request counter, the latency histogram), in
interleaved blocks in one run. Also one scrape (`render`) of a server with `--series`
label combinations, old against new.

Run: `.venv/bin/python bench/bench_metrics.py` (a few seconds; `--old REV` for another
baseline). Prints the median and p90 per request in microseconds. Not a test: nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from timing import interleaved, machine, percentile

from blindinfer.server import metrics as new_metrics

ROOT = Path(__file__).resolve().parent.parent
OLD_REV = "b5c6c84"  # the last commit with the hand-written registry
ROUTES = ("/v2/models/{ref}/infer", "/v2/health/live", "/v2/models/{ref}")


def old_module(rev: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:src/blindinfer/server/metrics.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("old_blindinfer_metrics")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:metrics.py", "exec"), module.__dict__)
    return module


def requests(metrics: Any, per_call: int) -> Callable[[], None]:
    """`per_call` requests recorded as MetricsMiddleware records them."""

    def record() -> None:
        for i in range(per_call):
            metrics.in_flight.inc()
            metrics.in_flight.dec()
            metrics.observe_request(ROUTES[i % 3], "POST", 200, 0.003)

    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=OLD_REV, help="git revision of the old metrics.py")
    parser.add_argument("--blocks", type=int, default=40, help="timed blocks per variant")
    parser.add_argument("--per-call", type=int, default=1000, help="requests per timed call")
    parser.add_argument("--series", type=int, default=60, help="label sets before a scrape")
    args = parser.parse_args()
    old = old_module(args.old)
    print(machine())
    variants = {
        "hand-written": old.ServerMetrics(),
        "prometheus_client": new_metrics.ServerMetrics(),
    }
    times = interleaved(
        {name: requests(m, args.per_call) for name, m in variants.items()},
        iterations=args.blocks,
        block=5,
    )
    print(f"recording one request ({args.per_call} per timed call, {args.blocks} calls each):")
    for name, samples in times.items():
        per = [ms * 1000 / args.per_call for ms in samples]
        print(
            f"  {name:18s} median {percentile(per, 50):5.2f} us  p90 {percentile(per, 90):5.2f} us"
        )

    for metrics in variants.values():
        for i in range(args.series):
            metrics.observe_request(f"/route/{i // 5}", "GET", 200 + i % 5, 0.01)
    scrapes = interleaved({name: m.render for name, m in variants.items()}, 50, block=5)
    print(f"one scrape of the recorded families ({args.series} request label sets):")
    for name, samples in scrapes.items():
        print(f"  {name:18s} median {percentile(samples, 50):6.3f} ms")


if __name__ == "__main__":
    main()
