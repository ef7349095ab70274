"""Dynamic batching of tensor runs (`serve --max-tensor-batch N`): 8 concurrent clients on a
server without it and on one with it, against in-process single-stream onnxruntime.

Two servers of this tree side by side (the same code: the option is not pinned by the
measurement), MiniLM-L6 batch 1 x 128 (and the MLP 64-256-10 batch 1 with `--mlp`). In
rounds, so that the machine's load hits every variant alike: in-process `session.run` in
one stream for `seconds`, then 8 clients (one attested connection each, one tenant) on
the server without batching, then on the one with it. Prints each round's requests/s as
a ratio to that round's in-process rate, and the medians.

Run: `.venv/bin/python bench/bench_tensor_batch.py` (`--rounds 4 --seconds 5` by
default; `--batch 8`). Extra server options after `--` go to both servers. Not a test:
nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_fixed_cost import concurrent_rps, connect, mrenclave_of, server_from  # noqa: E402
from timing import machine  # noqa: E402

from support import onnx_models  # noqa: E402


def in_process_rps(session: ort.InferenceSession, feed: dict[str, np.ndarray], s: float) -> float:
    for _ in range(3):
        session.run(None, feed)
    count = 0
    start = time.perf_counter()
    stop = start + s
    while time.perf_counter() < stop:
        session.run(None, feed)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mlp", action="store_true", help="the MLP instead of MiniLM")
    parser.add_argument("server_args", nargs="*", help="options for both servers (after --)")
    args = parser.parse_args()
    print(machine())
    if args.mlp:
        label = "mlp-64-256-10 b1"
        model = onnx_models.model_bytes(onnx_models.mlp_model())
        feed = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}
    else:
        from support import minilm

        label = "minilm-l6 b1x128"
        model = minilm.minilm_onnx_path().read_bytes()
        feed = minilm.minilm_inputs(["The quick brown fox jumps over the lazy dog."], seq_len=128)
    options = {"off": [], "on": ["--max-tensor-batch", str(args.batch)]}
    enclave = mrenclave_of(None)
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(server_from(None, [*args.server_args, *extra]))
            for name, extra in options.items()
        }
        ids = {}
        for name, server in servers.items():
            with connect(server.url, enclave) as client:
                ids[name] = client.upload_model(model, name="m").model_id
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        ratios: dict[str, list[float]] = {name: [] for name in servers}
        rates: dict[str, list[float]] = {"in-process": [], **{name: [] for name in servers}}
        for round_ in range(args.rounds):
            single = in_process_rps(session, feed, args.seconds)
            rates["in-process"].append(single)
            line = [f"round {round_ + 1}: in-process {single:6.1f}/s"]
            for name, server in servers.items():
                rps = concurrent_rps(server.url, enclave, True, ids[name], feed, args.seconds)
                rates[name].append(rps)
                ratios[name].append(rps / single)
                line.append(f"8 clients {name} {rps:6.1f}/s ({rps / single:.2f})")
            line.append(f"on/off {rates['on'][-1] / rates['off'][-1]:.2f}")
            print(", ".join(line), flush=True)
        print(f"\n{label}, medians over {args.rounds} rounds:")
        print(f"  in-process single stream {statistics.median(rates['in-process']):6.1f} req/s")
        gains = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
        print(f"  on/off per round: median {statistics.median(gains):.2f}")
        for name in servers:
            shown = ", ".join(f"{r:.2f}" for r in ratios[name])
            print(
                f"  8 clients, batching {name:<3} {statistics.median(rates[name]):6.1f} req/s, "
                f"ratio median {statistics.median(ratios[name]):.2f} ({shown})"
            )


if __name__ == "__main__":
    main()
