"""Where the milliseconds of an upload (until sealed) and of a reload from the sealed
store go, stage by stage, each stage as it was (HEAD before issue 11) and as it is now,
side by side in ONE interleaved run (bench/timing.py). In-process: no TLS, no HTTP; the
end-to-end figures are bench_resilience.py's (2) and (3).

Upload (128 MiB initializer model, `hostile_models.large_initializer_model`):
  body      the route collecting the streamed body (256 KiB chunks, what uvicorn hands
            over) while hashing it, in an event loop: the SHA-256 on the loop between
            copies (before) vs on a thread beside them (now, server/upload_digest.py)
  to-worker the model crossing the worker pipe: Connection.recv_bytes (before) vs one
            recv(MSG_WAITALL) into the final bytes (now, workers._recv_payload)
  validate  in the worker: refuse_external_data + onnx.checker + session; the session
            parsed the whole model once more for external data (before), not now
  seal      SHA-256 pass, then encrypt + fsync (before, `put`) vs the hash computed in
            the encryption loop (now, `stage_blob` + `put_staged`); now it also runs on
            its own thread while the worker validates, so it leaves the critical path
Reload (64 MiB Gather model, bench_resilience.gather_model):
  get       read + AES-GCM decrypt + SHA-256 check (unchanged)
  to-worker as above
  session   refuse_external_data + onnxruntime session (unchanged: not yet validated in
            this process's memory, see docs/performance.md)

The worker's validation of the upload is also shown step by step ("validate, step by
step", this process, no pipe): refuse_external_data, onnx.checker, the onnxruntime
session, and the malloc_trim + RSS reads of the memory measurement.

Run: `.venv/bin/python bench/bench_upload_path.py` (`--rounds N`, default 3). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from timing import interleaved, machine  # noqa: E402

from blindinfer.runtime.external_data import refuse_external_data  # noqa: E402
from blindinfer.runtime.session import ModelSession  # noqa: E402
from blindinfer.runtime.workers import _check_model, _recv_payload, _rss_bytes, _trim  # noqa: E402
from blindinfer.server.upload_digest import BackgroundSha256  # noqa: E402
from blindinfer.store.sealed import ModelRecord, SealedStore  # noqa: E402
from support import hostile_models  # noqa: E402

MiB = 1 << 20
CHUNK = 256 * 1024


async def _arrivals(model: memoryview) -> AsyncIterator[bytes]:
    """The body as uvicorn hands it to the route: fresh `bytes` chunks, one loop turn each.
    (A memoryview, not the bytes: asyncio's task repr would print all 128 MiB.)"""
    for start in range(0, len(model), CHUNK):
        await asyncio.sleep(0)
        yield bytes(model[start : start + CHUNK])


async def _body_before(model: memoryview) -> tuple[bytes, str]:
    chunks = io.BytesIO()
    digest = hashlib.sha256()
    async for chunk in _arrivals(model):
        chunks.write(chunk)
        digest.update(chunk)
    return chunks.getvalue(), digest.hexdigest()


async def _body_now(model: memoryview) -> tuple[bytes, str]:
    chunks = io.BytesIO()
    digest = BackgroundSha256()
    try:
        async for chunk in _arrivals(model):
            chunks.write(chunk)
            await digest.feed(chunk)
        sha256 = await digest.hexdigest()
    finally:
        digest.close()
    return chunks.getvalue(), sha256


def _run(body: Callable[[memoryview], Awaitable[tuple[bytes, str]]], model: bytes) -> str:
    """Runs one collection; the task's result stays small (asyncio's task repr, which
    something in asyncio.run asks for, would print a 128 MiB result: seconds)."""
    kept: list[tuple[bytes, str]] = []

    async def collect() -> None:
        kept.append(await body(memoryview(model)))

    asyncio.run(collect())
    return kept[0][1]


def body_before(model: bytes) -> str:
    return _run(_body_before, model)


def body_now(model: bytes) -> str:
    return _run(_body_now, model)


def _receiver(conn: Connection, new: bool) -> None:
    """A stand-in worker: receives each model frame and acknowledges it."""
    while True:
        data = _recv_payload(conn) if new else conn.recv_bytes()
        if not data:
            return
        conn.send_bytes(b"ok")


class Pipe:
    """A spawned receiver, as the worker pool starts its workers."""

    def __init__(self, new: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_receiver, args=(child, new), daemon=True)
        self.process.start()

    def send(self, data: bytes) -> None:
        self.conn.send_bytes(data)
        self.conn.recv_bytes()

    def close(self) -> None:
        self.conn.send_bytes(b"")
        self.process.join()


def validate_before(model: bytes) -> None:
    _check_model(model)
    ModelSession(model)  # parses the model for external data once more


def validate_now(model: bytes) -> None:
    _check_model(model)
    ModelSession(model, external_data_refused=True)


class Seal:
    def __init__(self, directory: Path) -> None:
        self.store = SealedStore(directory, os.urandom(32), max_bytes=1 << 40)
        self.count = 0

    def _record(self, model: bytes, sha: str) -> ModelRecord:
        self.count += 1
        return ModelRecord(f"m{self.count}", "n", sha, "o", len(model), 0.0)

    def before(self, model: bytes, sha: str) -> None:
        record = self._record(model, sha)
        self.store.put(record, model)  # hashes, then encrypts
        self.store.delete(record.model_id)

    def now(self, model: bytes, sha: str) -> None:
        record = self._record(model, sha)
        staged = self.store.stage_blob(sha, model)
        try:
            self.store.put_staged(record, staged)
        finally:
            self.store.discard(staged)
        self.store.delete(record.model_id)


def validation_steps(model: bytes, rounds: int) -> None:
    """The worker's `_load` with check=True, one step at a time (as it runs today)."""
    import onnx

    steps: dict[str, list[float]] = {}

    def timed(name: str, call: Callable[[], object]) -> object:
        start = time.perf_counter()
        result = call()
        steps.setdefault(name, []).append((time.perf_counter() - start) * 1000)
        return result

    for _ in range(rounds + 1):  # the first round warms up and is dropped
        timed("refuse_external_data (protobuf parse, upb)", lambda: refuse_external_data(model))
        timed("onnx.checker (C++ parse + checks)", lambda: _check_onnx(onnx, model))
        timed("malloc_trim + RSS before", lambda: (_trim(), _rss_bytes()))
        session = timed(
            "onnxruntime session (parse, optimize, initializers)",
            lambda: ModelSession(model, external_data_refused=True),
        )
        timed("malloc_trim + RSS after", lambda: (_trim(), _rss_bytes()))
        del session
    print("  validate, step by step (this process; median ms, warm-up dropped):")
    for name, values in steps.items():
        print(f"    {name:<56} {statistics.median(values[1:]):>9.1f}")


def _check_onnx(onnx: Any, model: bytes) -> None:
    onnx.checker.check_model(model, full_check=False)


def report(title: str, results: dict[str, list[float]]) -> None:
    print(
        f"  {title:<58} {statistics.median(results['before']):>9.1f} "
        f"{statistics.median(results['now']):>9.1f}"
    )


def stage(
    title: str, before: Callable[[], object], now: Callable[[], object], rounds: int
) -> tuple[float, float]:
    results = interleaved({"before": before, "now": now}, rounds, block=1, warmup=1)
    report(title, results)
    return statistics.median(results["before"]), statistics.median(results["now"])


# --------------------------------------------------------------------------- end to end


LIMITS = {"max_model_bytes": 512 * MiB, "workers": 2, "max_stored_bytes": 4 << 30}
"""The end-to-end servers' limits (bench_resilience's (3), with room for the uploads)."""


def _policy(source: Path | None) -> Any:
    """Pins a server running `source`'s code (the simulated MRENCLAVE measures src/)."""
    import blindinfer
    from blindinfer.server.config import Limits, ServerConfig
    from blindinfer.server.platforms import simulated_mrenclave
    from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER

    config = ServerConfig(simulation=True, limits=Limits(**LIMITS))
    if source is None:
        mrenclave = simulated_mrenclave(config)
    else:
        code = (
            "from blindinfer.server.config import Limits, ServerConfig;"
            "from blindinfer.server.platforms import simulated_mrenclave;"
            "print(simulated_mrenclave(ServerConfig(simulation=True, "
            f"limits=Limits(**{LIMITS!r}))).hex())"
        )
        env = {**os.environ, "PYTHONPATH": str(source / "src")}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
        )
        mrenclave = bytes.fromhex(out.stdout.strip())
    return blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(mrenclave,),
            mrsigner=(SIMULATION_MRSIGNER,),
            isvprodid=(config.isvprodid,),
            min_isvsvn=config.isvsvn,
        )
    )


def _serve(source: Path | None, store: Path) -> tuple[subprocess.Popen[str], str]:
    from bench_resilience import server_args

    from blindinfer.server.config import Limits
    from blindinfer.server.process import READY_PREFIX

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if source is not None:
        env["PYTHONPATH"] = str(source / "src")
    command = [sys.executable, "-m", "blindinfer.cli.main", "serve", "--port", "0"]
    process = subprocess.Popen(
        [*command, *server_args(Limits(**LIMITS), f"--store-dir={store}")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(READY_PREFIX):
            return process, line[len(READY_PREFIX) :].strip()
    raise RuntimeError("the server did not start")


def end_to_end(uploads: int, baseline: Path | None) -> None:
    """128 MiB uploads through attested TLS to a server of this tree and, with
    --baseline-src, one of another checkout, alternating; distinct models, deleted
    between. The send phase ends when the client's last chunk is taken by the socket."""
    import warnings

    import blindinfer

    sources = {"now": None, **({"baseline": baseline} if baseline is not None else {})}
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-upload-e2e-") as tmp:
        servers, clients = [], {}
        try:
            for label, source in sources.items():
                process, url = _serve(source, Path(tmp) / label)
                servers.append(process)
                policy = _policy(source)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", blindinfer.SimulationWarning)
                    clients[label] = blindinfer.connect(
                        url, policy=policy, simulation=True, retry=blindinfer.NO_RETRY
                    )
                results[label] = {"total": [], "send": [], "after": []}
            for client in clients.values():  # warm-up: onnxruntime in the workers
                warm = hostile_models.large_initializer_model(16 * MiB, seed=5)
                client.delete_model(client.upload_model(warm, name="warm").model_id)
            for index in range(uploads):
                model = hostile_models.large_initializer_model(128 * MiB, seed=3000 + index)
                order = list(clients) if index % 2 == 0 else list(reversed(clients))
                for label in order:
                    last = [0.0]

                    def sent(done: int, total: int, last: list[float] = last) -> None:
                        if done == total:
                            last[0] = time.perf_counter()

                    start = time.perf_counter()
                    info = clients[label].upload_model(model, name=f"u{index}", progress=sent)
                    end = time.perf_counter()
                    results[label]["total"].append((end - start) * 1000)
                    results[label]["send"].append((last[0] - start) * 1000)
                    results[label]["after"].append((end - last[0]) * 1000)
                    clients[label].delete_model(info.model_id)
        finally:
            for client in clients.values():
                client.close()
            for process in servers:
                process.kill()
                process.wait()
    print(f"end to end, 128 MiB through attested TLS, {uploads} uploads each (median ms):")
    print(f"  {'server':<10} {'total':>8} {'MB/s':>7} {'send':>8} {'after last byte':>16}")
    for label, phases in results.items():
        total = statistics.median(phases["total"])
        print(
            f"  {label:<10} {total:>8.0f} {128 * MiB / 1e3 / total:>7.1f} "
            f"{statistics.median(phases['send']):>8.0f} "
            f"{statistics.median(phases['after']):>16.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--e2e", type=int, metavar="N", help="only N uploads through attested TLS (see end_to_end)"
    )
    parser.add_argument("--baseline-src", type=Path, help="with --e2e: another checkout, too")
    args = parser.parse_args()
    if args.e2e:
        print(f"upload end to end; {machine()}")
        end_to_end(args.e2e, args.baseline_src)
        return
    rounds = args.rounds
    print(f"upload / reload path, stage by stage; {machine()}")
    print(f"reproduce: .venv/bin/python bench/bench_upload_path.py --rounds {rounds}")
    print(
        f"  {'stage (median ms of ' + str(rounds) + ', interleaved)':<58} {'before':>9} {'now':>9}"
    )

    from bench_resilience import gather_model

    upload = hostile_models.large_initializer_model(128 * MiB, seed=1)
    sha = hashlib.sha256(upload).hexdigest()
    reload = gather_model(64 * MiB, 1)
    old_pipe, new_pipe = Pipe(new=False), Pipe(new=True)
    print("upload, 128 MiB:")
    with tempfile.TemporaryDirectory(prefix="bench-upload-path-") as tmp:
        seal = Seal(Path(tmp))
        totals = [
            stage(
                "body: collect 256 KiB chunks + SHA-256 (loop vs thread)",
                lambda: body_before(upload),
                lambda: body_now(upload),
                rounds,
            ),
            stage(
                "to-worker: 128 MiB over the worker pipe",
                lambda: old_pipe.send(upload),
                lambda: new_pipe.send(upload),
                rounds,
            ),
            stage(
                "validate: external data, onnx.checker, session",
                lambda: validate_before(upload),
                lambda: validate_now(upload),
                rounds,
            ),
            stage(
                "seal: SHA-256 check, AES-GCM, fsync, commit",
                lambda: seal.before(upload, sha),
                lambda: seal.now(upload, sha),
                rounds,
            ),
        ]
        serial_before = sum(b for b, _ in totals)
        # now, sealing runs beside the worker's transfer + validation
        overlapped_now = totals[0][1] + max(totals[1][1] + totals[2][1], totals[3][1])
        print(
            f"  {'sum (before: serial; now: seal beside validation)':<58} "
            f"{serial_before:>9.1f} {overlapped_now:>9.1f}"
        )
        validation_steps(upload, rounds)
        print("reload, 64 MiB:")
        reload_sha = hashlib.sha256(reload).hexdigest()
        seal.store.put(ModelRecord("reload", "n", reload_sha, "o", len(reload), 0.0), reload)
        get = stage(
            "get: read, AES-GCM decrypt, SHA-256 check",
            lambda: seal.store.get("reload"),
            lambda: seal.store.get("reload"),
            rounds,
        )
        pipe = stage(
            "to-worker: 64 MiB over the worker pipe",
            lambda: old_pipe.send(reload),
            lambda: new_pipe.send(reload),
            rounds,
        )
        refuse = stage(
            "refuse_external_data (kept on reload)",
            lambda: refuse_external_data(reload),
            lambda: refuse_external_data(reload),
            rounds,
        )
        session = stage(
            "onnxruntime session",
            lambda: ModelSession(reload, external_data_refused=True),
            lambda: ModelSession(reload, external_data_refused=True),
            rounds,
        )
        parts = (get, pipe, refuse, session)
        print(f"  {'sum':<58} {sum(b for b, _ in parts):>9.1f} {sum(n for _, n in parts):>9.1f}")
    old_pipe.close()
    new_pipe.close()


if __name__ == "__main__":
    main()
