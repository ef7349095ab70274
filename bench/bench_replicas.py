"""Replicas behind a load balancer: throughput with 1, 2 and 3, and what a replica's key
costs a client to attest.

In ONE run: three simulation replicas (`--workers 1` each, one shared sealed store, each
with its own --replica-id and TLS key) and one HAProxy (TCP mode, TLS ends in the
replicas) per replica count, over the first 1, 2 or 3 replicas. The models are uploaded
once through the balancer (shared store) and run once on every replica before timing.

(1) throughput: `connect(url, replicas=N)` (N=1: the strict pin), THREADS client threads
    running the model back to back for SECONDS; requests per second. Cases alternate in
    blocks (CASES, then CASES again, ...) so that load from elsewhere spreads over all of
    them; medians over the rounds. One case is a replicas=3 client before one replica:
    the key check's cost beside the strict pin. MLP 64-256-10 batch 1, and MiniLM-L6
    batch 1 x 128 tokens when its ONNX export is available (`--no-minilm` skips it).
(2) attesting one more replica: on one replica's own port, a new TCP+TLS connection whose
    key the client has NOT attested (POST + GET /v2/attestation on it, verification)
    against one whose key it has (handshake and lookup only), alternating; the
    difference of the medians is what one more replica's key costs, once per key (and
    again every max_attestation_age).

This machine's cores are shared by the client threads, the balancer and every replica,
so the throughput numbers show what the balancer and the per-replica key check cost, not
what more machines would give. Prints the load average. Run:
`.venv/bin/python bench/bench_replicas.py 2>/dev/null`. Not a test: nothing here asserts
a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import blindinfer  # noqa: E402
from blindinfer.client.attested_keys import AttestedKeys  # noqa: E402
from blindinfer.client.client import replica_verifier  # noqa: E402
from blindinfer.client.replica_gate import KeyGate, attest_first  # noqa: E402
from blindinfer.server.config import Limits, ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support.onnx_models import mlp_model, model_bytes  # noqa: E402
from support.replicas import balancer, haproxy_available, replica_set  # noqa: E402

THREADS = 8
CASES = ((1, 1), (1, 3), (2, 2), (3, 3))
"""(replicas behind the balancer, connect's replicas=): (1, 3) is the key check's own
cost per request (none once a connection is attested) beside the strict pin (1, 1)."""


def connect(url: str, replicas: int) -> blindinfer.Client:
    config = ServerConfig(simulation=True, limits=Limits(workers=1))
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(config),),
            mrsigner=(SIMULATION_MRSIGNER,),
            isvprodid=(config.isvprodid,),
            min_isvsvn=config.isvsvn,
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(url, policy=policy, simulation=True, replicas=replicas)


def models(include_minilm: bool) -> list[tuple[str, bytes, dict[str, np.ndarray]]]:
    found = [("mlp", model_bytes(mlp_model()), {"x": np.ones((1, 64), dtype=np.float32)})]
    if include_minilm:
        try:
            from support import minilm

            path = minilm.minilm_onnx_path()
            feed = minilm.minilm_inputs(["The quick brown fox jumps over the lazy dog."], 128)
            found.append(("minilm", path.read_bytes(), dict(feed)))
        except Exception as exc:  # no export available here: the MLP alone
            print(f"(MiniLM skipped: {type(exc).__name__}: {exc})", file=sys.stderr)
    return found


def throughput(
    client: blindinfer.Client, model: str, feed: dict[str, np.ndarray], seconds: float
) -> float:
    stop = threading.Event()
    counts = [0] * THREADS
    failures: list[BaseException] = []

    def run(index: int) -> None:
        while not stop.is_set():
            try:
                client.run_model(model, feed)
            except Exception as exc:
                failures.append(exc)
                return
            counts[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return sum(counts) / (time.perf_counter() - start)


def attestation_cost(url: str, pairs: int) -> tuple[float, float]:
    """Medians (ms) of a new connection to an unattested key, and to an attested one."""
    verify = replica_verifier(None, True, None)
    known = KeyGate(url, AttestedKeys(max_keys=2), verify)
    attest_first(known, 30.0)
    fresh_ms, known_ms = [], []
    for _ in range(pairs):
        gate = KeyGate(url, AttestedKeys(max_keys=2), verify)
        start = time.perf_counter()
        attest_first(gate, 30.0)
        fresh_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        attest_first(known, 30.0)
        known_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(fresh_ms), statistics.median(known_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args()
    if not haproxy_available():
        sys.exit("needs haproxy (Debian's package; scripts/test.sh installs it)")
    chosen = models(not args.no_minilm)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        replicas = stack.enter_context(replica_set(Path(tmp) / "store", 3, ["--workers=1"]))
        urls = {1: stack.enter_context(balancer(Path(tmp), replicas.ports[:1]))}
        urls[2] = stack.enter_context(balancer(Path(tmp), replicas.ports[:2]))
        urls[3] = replicas.url
        with connect(replicas.url, 3) as uploader:
            for name, data, _ in chosen:
                uploader.upload_model(data, name=name)
        for index in range(3):  # each replica loads each model before timing
            with connect(replicas.direct_url(index), 1) as direct:
                for name, _, feed in chosen:
                    direct.run_model(name, feed)
        clients = {c: stack.enter_context(connect(urls[c[0]], c[1])) for c in CASES}
        rates: dict[tuple[str, tuple[int, int]], list[float]] = {}
        for _ in range(args.rounds):
            for name, _, feed in chosen:
                for case in CASES:
                    rate = throughput(clients[case], name, feed, args.seconds)
                    rates.setdefault((name, case), []).append(rate)
        fresh, known = attestation_cost(replicas.direct_url(0), args.pairs)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
    print(f"throughput, {THREADS} client threads, req/s (median of {args.rounds} rounds):")
    for name, _, _ in chosen:
        one = statistics.median(rates[(name, CASES[0])])
        for case in CASES:
            rate = statistics.median(rates[(name, case)])
            print(
                f"  {name:7s} {case[0]} behind the balancer, connect(replicas={case[1]}): "
                f"{rate:7.1f} req/s ({rate / one:4.2f}x)"
            )
    print(
        f"attesting one more replica's key: new connection to an unattested key "
        f"{fresh:.2f} ms, to an attested one {known:.2f} ms: {fresh - known:.2f} ms per key "
        f"(median of {args.pairs} pairs)"
    )


if __name__ == "__main__":
    main()
