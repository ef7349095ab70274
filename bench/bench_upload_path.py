"""Where the milliseconds of an upload (until sealed) and of a reload from the sealed
store go, stage by stage, each stage as it was (HEAD before issue 11) and as it is now,
side by side in ONE interleaved run (bench/timing.py). In-process: no TLS, no HTTP; the
end-to-end figures are bench_resilience.py's (2) and (3).

Upload (128 MiB initializer model, `hostile_models.large_initializer_model`):
  body      the route collecting the streamed body (64 KiB chunks) while hashing it:
            bytearray + bytes() (before) vs io.BytesIO, whose getvalue() is no copy (now)
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

Run: `.venv/bin/python bench/bench_upload_path.py` (`--rounds N`, default 3). Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from timing import interleaved, machine  # noqa: E402

from blindinfer.runtime.external_data import refuse_external_data  # noqa: E402
from blindinfer.runtime.session import ModelSession  # noqa: E402
from blindinfer.runtime.workers import _check_model, _recv_payload  # noqa: E402
from blindinfer.store.sealed import ModelRecord, SealedStore  # noqa: E402
from support import hostile_models  # noqa: E402

MiB = 1 << 20
CHUNK = 64 * 1024


def body_before(model: bytes) -> tuple[bytes, str]:
    chunks = bytearray()
    digest = hashlib.sha256()
    for start in range(0, len(model), CHUNK):
        chunk = model[start : start + CHUNK]
        chunks += chunk
        digest.update(chunk)
    return bytes(chunks), digest.hexdigest()


def body_now(model: bytes) -> tuple[bytes, str]:
    chunks = io.BytesIO()
    digest = hashlib.sha256()
    for start in range(0, len(model), CHUNK):
        chunk = model[start : start + CHUNK]
        chunks.write(chunk)
        digest.update(chunk)
    return chunks.getvalue(), digest.hexdigest()


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
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
                "body: collect 64 KiB chunks + SHA-256",
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
