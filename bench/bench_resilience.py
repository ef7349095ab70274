"""What the resilience machinery costs: memory per model, eviction, uploads, noisy neighbours.

In ONE run, each part on its own fresh simulation server (separate process, loopback
attested TLS, sealed store in a temporary directory):
  (1) memory per loaded model vs its file size: initializer models of 8, 32 and 128 MiB
      (`hostile_models.large_initializer_model`), uploaded to a warmed-up server; the
      measured session memory (admin stats `memory_used_bytes` delta, what the budget
      counts) and the resident memory of the server's process tree (server + workers,
      `procmem.rss_bytes`) delta after the upload; both as a ratio to the file size.
  (2) eviction and reload: a memory budget that fits one 64 MiB-weight model but not two,
      two such models, runs alternating between them. "cold" = a run on the model that is
      not loaded (evicts the other, reloads from the sealed store, builds the session,
      runs); "warm" = the next run on the same, now loaded, model. The model here is
      y = Gather(W, x) with a 64 MiB W and a 4-element x, so that the timings are the
      reload and not a 64 MiB tensor crossing the wire each way.
  (3) upload throughput through attested TLS: 16 and 128 MiB models, time until the upload
      is acknowledged (transfer, onnx.checker and session build in a worker, sealing to
      disk); distinct bytes each time, deleted in between.
  (4) noisy neighbour: two tenants (auth file), --workers 2. Tenant A runs its model (MLP
      64-256-10, and MiniLM batch 1 x 128 tokens if installed) sequentially; tenant B
      floods the server from another process (8 threads, own connections) with a
      1x128x384 in/out model, B's rate limit set very high but max_concurrent_inferences
      = 2. A's latency during the flood vs idle, in alternating windows of the same length
      (idle, flood, idle, flood, ...); B's successes and 429s are counted.
Prints medians and p99. Run: `.venv/bin/python bench/bench_resilience.py` (`--quick` for
fewer iterations, `--no-minilm` to skip MiniLM; the servers' banners go to stderr, add
`2>/dev/null` for the table alone). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from timing import machine, percentile  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.client.transport import pinned_context  # noqa: E402
from blindinfer.server.auth import generate_api_key  # noqa: E402
from blindinfer.server.config import Limits, ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import ServerProcess, start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import hostile_models, onnx_models, procmem  # noqa: E402

MiB = 1 << 20


def med_p99(samples: list[float]) -> str:
    return f"{statistics.median(samples):8.2f} / {percentile(samples, 99):8.2f}"


# --------------------------------------------------------------------------- servers


def policy_for(limits: Limits) -> blindinfer.Policy:
    config = ServerConfig(simulation=True, limits=limits)
    return blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(config),),
            mrsigner=(SIMULATION_MRSIGNER,),
            isvprodid=(config.isvprodid,),
            min_isvsvn=config.isvsvn,
        )
    )


def server_args(limits: Limits, *extra: str) -> list[str]:
    return [
        "--simulation",
        f"--max-model-bytes={limits.max_model_bytes}",
        f"--max-request-bytes={limits.max_request_bytes}",
        f"--max-models={limits.max_models}",
        f"--memory-budget-bytes={limits.memory_budget_bytes}",
        f"--max-stored-bytes={limits.max_stored_bytes}",
        f"--workers={limits.workers}",
        f"--worker-memory-bytes={limits.worker_memory_bytes}",
        f"--queue-limit={limits.queue_limit}",
        f"--inference-timeout-ms={limits.inference_timeout_ms}",
        *extra,
    ]


@contextmanager
def running(limits: Limits, *extra: str) -> Iterator[ServerProcess]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-resilience-") as tmp,
        start_server(server_args(limits, f"--store-dir={Path(tmp) / 'store'}", *extra)) as s,
    ):
        yield s


def connect(url: str, policy: blindinfer.Policy, api_key: str | None = None) -> blindinfer.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(
            url, policy=policy, simulation=True, api_key=api_key, retry=blindinfer.NO_RETRY
        )


def admin_stats(client: blindinfer.Client) -> dict[str, int]:
    with httpx.Client(verify=pinned_context(client.attestation.certificate_der)) as raw:
        document: dict[str, int] = raw.get(client.url + "/v2/admin/stats").json()
        return document


def warm_up(client: blindinfer.Client) -> None:
    """Starts onnxruntime in the workers so that the baselines do not include it."""
    mlp = onnx_models.model_bytes(onnx_models.mlp_model(seed=77))
    info = client.upload_model(mlp, name="warm-up")
    for _ in range(5):
        client.run_model(info.model_id, {"x": np.ones((1, 64), np.float32)})
    client.delete_model(info.model_id)


# --------------------------------------------------------------------------- (1) memory


def memory_per_model(sizes_mib: list[int]) -> list[tuple[int, int, int, int]]:
    """(file bytes, stats delta, RSS delta, RSS delta after delete), one fresh server each."""
    limits = Limits(max_model_bytes=512 * MiB, memory_budget_bytes=4096 * MiB, workers=2)
    rows = []
    for size in sizes_mib:
        model = hostile_models.large_initializer_model(size * MiB, seed=size)
        with running(limits) as server, connect(server.url, policy_for(limits)) as client:
            warm_up(client)
            time.sleep(0.3)
            used0 = admin_stats(client)["memory_used_bytes"]
            rss0 = procmem.rss_bytes(server.process.pid)
            info = client.upload_model(model, name=f"mem-{size}")
            time.sleep(0.3)
            used1 = admin_stats(client)["memory_used_bytes"]
            rss1 = procmem.rss_bytes(server.process.pid)
            client.delete_model(info.model_id)
            time.sleep(0.3)
            rss2 = procmem.rss_bytes(server.process.pid)
        rows.append((len(model), used1 - used0, rss1 - rss0, rss2 - rss0))
    return rows


# --------------------------------------------------------------------------- (2) eviction


def gather_model(nbytes: int, seed: int) -> bytes:
    """x: INT64 [4] -> y = Gather(W, x): FP32 [4], with W an FP32 initializer of `nbytes`.
    The indices are an input, so nothing can be folded away at load: W stays resident."""
    weight = np.random.default_rng(seed).standard_normal(nbytes // 4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["W", "x"], ["y"], axis=0)],
        "gather_initializer",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", onnx_models.OPSET)],
        doc_string=f"{nbytes} bytes of weights, 4 gathered",
    )
    model.ir_version = 8
    return onnx_models.model_bytes(model)


def eviction(
    size: int, cost_ratio: float, alternations: int
) -> tuple[list[float], list[float], dict[str, int], int]:
    """Cold and warm run latencies (ms), the final stats and the budget used."""
    budget = int(1.5 * cost_ratio * size)  # one fits, two do not
    limits = Limits(memory_budget_bytes=budget, workers=1)
    feed = {"x": np.array([0, 1, 2, 3], np.int64)}
    models = [gather_model(size, seed) for seed in (1, 2)]
    cold: list[float] = []
    warm: list[float] = []
    with running(limits) as server, connect(server.url, policy_for(limits)) as client:
        warm_up(client)
        ids = [client.upload_model(m, name=f"evict-{i}").model_id for i, m in enumerate(models)]
        client.run_model(ids[1], feed)  # ids[1] loaded, ids[0] evicted
        for index in range(2 * alternations):
            target = ids[index % 2]
            start = time.perf_counter()
            client.run_model(target, feed)
            cold.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            client.run_model(target, feed)
            warm.append((time.perf_counter() - start) * 1000)
        stats = admin_stats(client)
    return cold, warm, stats, budget


# --------------------------------------------------------------------------- (3) uploads


def upload_throughput(sizes_mib: list[int], uploads: int) -> list[tuple[int, list[float]]]:
    """Seconds per acknowledged upload for each size."""
    limits = Limits(max_model_bytes=512 * MiB, workers=2)
    rows = []
    with running(limits) as server, connect(server.url, policy_for(limits)) as client:
        warm_up(client)
        for size in sizes_mib:
            seconds = []
            for seed in range(uploads):
                model = hostile_models.large_initializer_model(size * MiB, seed=1000 + seed)
                start = time.perf_counter()
                info = client.upload_model(model, name=f"up-{size}-{seed}")
                seconds.append(time.perf_counter() - start)
                client.delete_model(info.model_id)
                del model
            rows.append((size, seconds))
    return rows


# --------------------------------------------------------------------------- (4) flood


def _flood(
    url: str,
    policy: blindinfer.Policy,
    key: str,
    model_id: str,
    threads: int,
    seconds: float,
    pipe: Connection,
) -> None:
    """Tenant B: `threads` connections sending inference requests in a loop, no pause."""
    feed = {"x": np.ones(hostile_models.EMBEDDING_SHAPE, np.float32)}
    clients = [connect(url, policy, key) for _ in range(threads)]
    counts = {"ok": 0, "429": 0, "other": 0}
    lock = threading.Lock()
    pipe.send("ready")
    cpu0 = time.process_time()
    stop = time.perf_counter() + seconds

    def worker(client: blindinfer.Client) -> None:
        mine = {"ok": 0, "429": 0, "other": 0}
        while time.perf_counter() < stop:
            try:
                client.run_model(model_id, feed)
                mine["ok"] += 1
            except blindinfer.ServerError as exc:
                mine["429" if exc.status == 429 else "other"] += 1
        with lock:
            for k, v in mine.items():
                counts[k] += v

    pool = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    counts["cpu_ms"] = round((time.process_time() - cpu0) * 1000)
    for c in clients:
        c.close()
    pipe.send(counts)


def auth_file(path: Path) -> dict[str, str]:
    keys = {}
    text = ""
    for tenant, role, rate, concurrent in (
        ("ops", "admin", 100, 4),
        ("a", "owner", 100_000, 4),
        ("b", "owner", 100_000, 2),
    ):
        key, sha = generate_api_key()
        keys[tenant] = key
        text += (
            f'[[tenant]]\nname = "{tenant}"\nrequests_per_second = {rate}\nburst = {rate}\n'
            f"max_concurrent_inferences = {concurrent}\n"
            f'[[tenant.key]]\nid = "{tenant}-{role}"\nrole = "{role}"\nsha256 = "{sha}"\n\n'
        )
    path.write_text(text)
    return keys


def a_models(include_minilm: bool) -> list[tuple[str, bytes, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    chosen = [
        (
            "MLP 64-256-10 b1",
            onnx_models.model_bytes(onnx_models.mlp_model()),
            {"x": rng.standard_normal((1, 64)).astype(np.float32)},
        )
    ]
    if include_minilm:
        try:
            from support import minilm

            path = minilm.minilm_onnx_path()
            feed = minilm.minilm_inputs(["The quick brown fox jumps over the lazy dog."], 128)
            chosen.append(("MiniLM-L6 b1x128", path.read_bytes(), dict(feed)))
        except Exception as exc:  # not installed: the MLP alone
            print(f"(MiniLM skipped: {exc})")
    return chosen


def sample_for(run: Callable[[], object], seconds: float) -> tuple[list[float], int]:
    """Sequential runs for `seconds`: latencies (ms) and the number of errors."""
    samples: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        start = time.perf_counter()
        try:
            run()
        except blindinfer.ServerError:
            errors += 1
            continue
        samples.append((time.perf_counter() - start) * 1000)
    return samples, errors


def noisy_neighbour(
    include_minilm: bool, rounds: int, seconds: float, threads: int, intra_op_threads: int = 0
) -> list[tuple[str, list[float], list[float], int, dict[str, int], float]]:
    limits = Limits(workers=2)
    policy = policy_for(limits)
    rows = []
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-resilience-auth-") as tmp:
        keys = auth_file(Path(tmp) / "auth.toml")
        with (
            running(
                limits,
                f"--auth-file={Path(tmp) / 'auth.toml'}",
                f"--intra-op-threads={intra_op_threads}",
            ) as server,
            connect(server.url, policy, keys["a"]) as a,
            connect(server.url, policy, keys["b"]) as b,
        ):
            flood_model = b.upload_model(hostile_models.embedding_output_model(), name="flood")
            b.run_model(flood_model.model_id, {"x": np.ones((1, 128, 384), np.float32)})
            for label, model, feed in a_models(include_minilm):
                info = a.upload_model(model, name=label.split()[0].lower())
                for _ in range(10):
                    a.run_model(info.model_id, feed)
                idle: list[float] = []
                flood: list[float] = []
                a_errors = 0
                totals = {"ok": 0, "429": 0, "other": 0, "cpu_ms": 0}
                for _ in range(rounds):
                    samples, errors = sample_for(
                        lambda m=info.model_id, f=feed: a.run_model(m, f), seconds
                    )
                    idle += samples
                    a_errors += errors
                    ours, theirs = spawn.Pipe()
                    child = spawn.Process(
                        target=_flood,
                        args=(
                            server.url,
                            policy,
                            keys["b"],
                            flood_model.model_id,
                            threads,
                            seconds + 0.5,
                            theirs,
                        ),
                    )
                    child.start()
                    assert ours.recv() == "ready"
                    time.sleep(0.25)  # let the flood ramp up
                    samples, errors = sample_for(
                        lambda m=info.model_id, f=feed: a.run_model(m, f), seconds
                    )
                    flood += samples
                    a_errors += errors
                    counts = ours.recv()
                    child.join()
                    for k, v in counts.items():
                        totals[k] += v
                flood_seconds = rounds * (seconds + 0.5)
                rows.append((label, idle, flood, a_errors, totals, flood_seconds))
                a.delete_model(info.model_id)
    return rows


# --------------------------------------------------------------------------- main


def eviction_table(cost_ratio: float, alternations: int) -> None:
    """Runs (2) and prints its table."""
    cold, warm, stats, budget = eviction(64 * MiB, cost_ratio, alternations)
    print(
        f"\n(2) eviction and reload: 2 Gather models with 64 MiB weights, budget "
        f"{budget / MiB:.0f} MiB (1.5 x the largest session/file ratio of (1) x 64 MiB), "
        f"--workers 1, {len(cold)} cold + {len(warm)} warm runs"
    )
    print(f"{'run':<58} {'median / p99 ms':>19}")
    print(f"{'warm (model loaded)':<58} {med_p99(warm)}")
    print(f"{'cold (evict the other, reload from sealed store, run)':<58} {med_p99(cold)}")
    print(
        f"cold - warm medians: {statistics.median(cold) - statistics.median(warm):.1f} ms; "
        f"end state: {stats['models']} models, {stats['loaded']} loaded, "
        f"{stats['memory_used_bytes'] / MiB:.1f} of {stats['memory_budget_bytes'] / MiB:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument(
        "--eviction-only",
        action="store_true",
        help="only (2), with a budget of 1.5 x 64 MiB x 1.01 (the ratio (1) measures)",
    )
    parser.add_argument("--alternations", type=int, default=None, help="(2): cold runs / 2")
    args = parser.parse_args()
    quick = args.quick
    if args.eviction_only:
        print(f"blindinfer resilience benchmark, (2) only; {machine()}")
        eviction_table(1.01, args.alternations or (5 if quick else 10))
        return
    print(f"blindinfer resilience benchmark ({'--quick' if quick else 'full'}); {machine()}")
    print(
        "reproduce: .venv/bin/python bench/bench_resilience.py"
        + (" --quick" if quick else "")
        + (" --no-minilm" if args.no_minilm else "")
    )
    print(
        "simulation servers, loopback attested TLS, sealed store in a temporary directory; "
        "the servers' banners go to stderr\n"
    )

    # (1)
    sizes = [8, 32, 128]
    memory = memory_per_model(sizes)
    print("(1) memory per loaded model (Mul initializer model, fresh warmed-up server each)")
    print(
        f"{'weights':>8} {'file bytes':>12} {'session (stats)':>16} {'ratio':>6} "
        f"{'tree RSS delta':>15} {'ratio':>6} {'RSS delta after delete':>23}"
    )
    for size, (file_bytes, used, rss, after) in zip(sizes, memory, strict=True):
        print(
            f"{size:>5} MiB {file_bytes:>12,} {used / MiB:>12.1f} MiB {used / file_bytes:>6.2f} "
            f"{rss / MiB:>11.1f} MiB {rss / file_bytes:>6.2f} {after / MiB:>19.1f} MiB"
        )
    cost_ratio = max(used / file_bytes for file_bytes, used, _, _ in memory)

    # (2)
    eviction_table(cost_ratio, args.alternations or (5 if quick else 10))

    # (3)
    uploads = 3 if quick else 5
    throughput = upload_throughput([16, 128], uploads)
    print(
        f"\n(3) upload through attested TLS until acknowledged (transfer + checker + session "
        f"build + seal to disk), {uploads} uploads per size, distinct bytes, deleted between"
    )
    print(f"{'weights':>8} {'median s':>9} {'min s':>7} {'max s':>7} {'median MB/s':>12}")
    for size, seconds in throughput:
        file_mb = size * MiB / 1e6
        print(
            f"{size:>5} MiB {statistics.median(seconds):>9.3f} {min(seconds):>7.3f} "
            f"{max(seconds):>7.3f} {file_mb / statistics.median(seconds):>12.1f}"
        )

    # (4)
    rounds = 1 if quick else 3
    seconds = 3.0 if quick else 5.0
    threads = 8
    for intra in (0, 1):
        rows = noisy_neighbour(not args.no_minilm, rounds, seconds, threads, intra)
        print(
            f"\n(4) tenant A sequential, idle vs while tenant B floods ({threads} threads in "
            f"another process, 1x128x384 model, B max_concurrent_inferences=2, 100k req/s "
            f"limit); --workers 2 --intra-op-threads {intra} "
            f"({'onnxruntime uses every core' if intra == 0 else 'one core per worker'}); "
            f"{rounds} x (idle {seconds:.0f} s, flood {seconds:.0f} s)"
        )
        print(
            f"{'A model':<18} {'idle med / p99 ms':>19} {'flood med / p99 ms':>19} "
            f"{'p99 flood/idle':>15} {'n idle/flood':>13} {'A err':>6}  B during flood"
        )
        for label, idle, flood, a_errors, counts, flood_seconds in rows:
            ratio = percentile(flood, 99) / percentile(idle, 99)
            print(
                f"{label:<18} {med_p99(idle)} {med_p99(flood)} {ratio:>15.2f} "
                f"{len(idle):>6}/{len(flood):<6} {a_errors:>6}  "
                f"{counts['ok']} ok ({counts['ok'] / flood_seconds:.0f}/s), "
                f"{counts['429']} x 429, {counts['other']} other; "
                f"B client CPU {counts['cpu_ms'] / 1000 / flood_seconds:.2f} cores"
            )
    print("\ntarget for (4): p99 flood/idle within 2x. Nothing here is asserted.")


if __name__ == "__main__":
    main()
