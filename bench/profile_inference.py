"""Where the milliseconds of one request go: client, TLS, server, worker hop, onnxruntime.

Runs a real server (simulation mode, attested TLS) with bench/profile_hooks/sitecustomize.py
on its PYTHONPATH, which timestamps the functions a run passes through in the server and in
its worker; the client's own steps are timestamped here. time.monotonic_ns is one clock for
all processes, so every request becomes one timeline; the table gives each segment's
median over the requests (sequential, one connection) and the segments' sum beside the
median total. Also measures in-process onnxruntime (interleaved, without hooks) and TLS
alone (encrypt + decrypt of the request's and the response's bytes through memory BIOs).

Run: `.venv/bin/python bench/profile_inference.py [--requests 200]`. Not a test. The
timestamps cost a few microseconds each (about 30 per request).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import ssl
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from timing import machine, timed  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.client import client as client_module  # noqa: E402
from blindinfer.client import common  # noqa: E402
from blindinfer.protocol.inference import encode_infer_response  # noqa: E402
from blindinfer.server.config import ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import onnx_models  # noqa: E402

Event = tuple[int, str]
_client_events: list[Event] = []
_recording = False


def _mark(event: str) -> None:
    if _recording:
        _client_events.append((time.monotonic_ns(), event))


def _around(owner: Any, name: str, event: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _mark(f"{event}.start")
        try:
            return original(*args, **kwargs)
        finally:
            _mark(f"{event}.end")

    setattr(owner, name, wrapper)


def _hook_client() -> None:
    _around(client_module.Client, "run_model", "c.run")
    _around(common, "encode_infer_request", "c.encode")
    _around(client_module.Client, "_send", "c.http")
    _around(ssl.SSLSocket, "send", "c.tls_send")  # httpcore's sync stream writes with send
    _around(ssl.SSLSocket, "recv", "c.tls_recv")
    _around(client_module, "infer_outputs", "c.decode")


def _read_events(folder: Path) -> tuple[list[Event], list[Event]]:
    server: list[Event] = []
    worker: list[Event] = []
    for path in folder.iterdir():
        target = worker if path.name.startswith("worker-") else server
        for line in path.read_text().splitlines():
            event, at = line.split()
            target.append((int(at), event))
    return sorted(server), sorted(worker)


def _window(events: list[Event], start: int, end: int) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for at, event in events:
        if start <= at <= end:
            found.setdefault(event, []).append(at)
    return found


# The chain of boundaries one request passes, in order; each segment is named by where it
# ends and lasts from the previous boundary to its own, so the segments of a request add up
# to its total exactly. (side, event): c client, s server, w worker; each event's first
# occurrence within the request's window.
CHAIN: list[tuple[str, str, str]] = [
    ("c", "c.run.start", ""),
    ("c", "c.encode.start", "client: inputs to arrays"),
    ("c", "c.encode.end", "client: encode the request (binary tensors)"),
    ("c", "c.tls_send.start", "client: httpx builds the request"),
    ("c", "c.tls_send.end", "client: TLS write of the request head"),
    ("s", "s.data_received.start", "loopback, server TLS decrypt, event loop wakes"),
    ("s", "s.read_body.start", "server: HTTP parse, routing, auth, model lookup"),
    ("s", "s.read_body.end", "server: read the body"),
    ("s", "s.parse.end", "server: parse + check the tensors"),
    ("s", "s.submit.start", "server: tenant slot"),
    ("s", "s.queue_thread.start", "server: submit, hop to the worker's queue thread"),
    ("s", "pipe_send.start", "queue thread: gate, placement checks"),
    ("w", "pipe_recv_tensors.end", "IPC to the worker (pipe: header + tensors)"),
    ("w", "w.ort_run.start", "worker: input checks"),
    ("w", "w.ort_run.end", "onnxruntime run (in the worker)"),
    ("w", "pipe_send.start", "worker: response size check"),
    ("w", "pipe_send.end", "worker: write outputs to the pipe"),
    ("s", "s.wait_worker.end", "IPC back: the server's thread wakes"),
    ("s", "pipe_recv_tensors.end", "IPC back: the server reads header + tensors"),
    ("s", "s.run_async.end", "queue thread -> event loop (future, wakeup)"),
    ("s", "s.encode.start", "server: receipt/encode dispatch"),
    ("s", "s.encode.end", "server: encode the response"),
    ("s", "s.respond.start", "server: Response object"),
    ("c", "c.tls_recv.end", "server write + TLS encrypt, loopback, client wakes"),
    ("c", "c.http.end", "client: TLS read of the rest, httpx response"),
    ("c", "c.decode.start", "client: retry/error wrapper"),
    ("c", "c.decode.end", "client: decode the response"),
    ("c", "c.run.end", "client: return"),
]


def breakdown(
    client_events: list[Event], server: list[Event], worker: list[Event]
) -> tuple[list[tuple[str, float]], float, int]:
    """Median ms per segment over the requests, the median total, and the requests' count."""
    per_segment: dict[str, list[float]] = {name: [] for _, _, name in CHAIN[1:]}
    totals: list[float] = []
    starts = [at for at, e in client_events if e == "c.run.start"]
    ends = [at for at, e in client_events if e == "c.run.end"]
    for start, end in zip(starts, ends, strict=True):
        sides = {
            "c": _window(client_events, start, end),
            "s": _window(server, start, end),
            "w": _window(worker, start, end),
        }
        # a boundary a code path does not pass (another path, a renamed function) is
        # skipped: its time goes to the next segment, and the request still adds up
        found = [
            (name, sides[side][event][0]) for side, event, name in CHAIN if event in sides[side]
        ]
        totals.append((end - start) / 1e6)
        for (_, before), (name, after) in itertools.pairwise(found):
            per_segment[name].append((after - before) / 1e6)
    medians = [(n, statistics.median(v)) for n, v in per_segment.items() if v]
    return medians, statistics.median(totals), len(totals)


def tls_alone(sizes: list[int], iterations: int = 200) -> list[float]:
    """ms to encrypt and decrypt `size` bytes over an established TLS 1.3 session."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = __import__("datetime").datetime.now(__import__("datetime").UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + __import__("datetime").timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    folder = Path(tempfile.mkdtemp())
    (folder / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(folder / "c.pem", folder / "k.pem")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = client_ctx.wrap_bio(bios[0], bios[1])
    s = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)

    def pump() -> None:
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())

    for _ in range(5):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        pump()
    results = []
    for size in sizes:
        payload = os.urandom(size)

        def once(p: bytes = payload) -> None:
            c.write(p)
            bios[2].write(bios[1].read())
            got = 0
            while got < len(p):
                got += len(s.read(len(p)))

        results.append(statistics.median(timed(once, iterations, warmup=5)))
    return results


def ort_settings(model: bytes, feed: dict[str, np.ndarray], n: int) -> dict[str, float]:
    """Median ms of in-process runs under the worker's session settings and others, in
    alternating blocks. "After 5 ms idle" times only the run that follows a 5 ms sleep, as
    in a worker between two requests: onnxruntime's pool has stopped spinning by then."""

    def session(arena: bool, threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = arena
        options.intra_op_num_threads = threads
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    runs = {
        label: functools.partial(session(arena, threads).run, None, feed)
        for arena, threads, label in (
            (True, 0, "arena on, all cores (the baseline)"),
            (False, 0, "arena off, all cores (the worker's settings)"),
            (False, 1, "arena off, 1 thread"),
        )
    }
    samples: dict[str, list[float]] = {}
    while min((len(v) for v in samples.values()), default=0) < n:
        for label, run in runs.items():
            samples.setdefault(label, []).extend(timed(run, 10))
            idle = samples.setdefault(label + ", after 5 ms idle", [])
            for _ in range(10):
                time.sleep(0.005)
                started = time.perf_counter()
                run()
                idle.append((time.perf_counter() - started) * 1000)
    return {label: statistics.median(v) for label, v in samples.items()}


def main() -> None:
    global _recording
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="blindinfer-profile-"))
    os.environ["BLINDINFER_PROFILE_DIR"] = str(folder)
    hooks = str(ROOT / "bench" / "profile_hooks")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (hooks, os.environ.get("PYTHONPATH")) if p
    )
    _hook_client()
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(ServerConfig(simulation=True)),),
            mrsigner=(SIMULATION_MRSIGNER,),
        )
    )
    chosen: list[tuple[str, bytes, dict[str, np.ndarray]]] = [
        (
            "mlp-64-256-10",
            onnx_models.model_bytes(onnx_models.mlp_model()),
            {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)},
        )
    ]
    if not args.no_minilm:
        from support import minilm

        feed = minilm.minilm_inputs(["The quick brown fox jumps over the lazy dog."], seq_len=128)
        chosen.insert(0, ("minilm-l6 b1x128", minilm.minilm_onnx_path().read_bytes(), feed))
    print(machine())
    with start_server(["--simulation"]) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(server.url, policy=policy, simulation=True)
        with client:
            for label, model, feed in chosen:
                info = client.upload_model(model, name=label.split()[0])
                session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
                in_process: list[float] = []
                for _ in range(20):
                    client.run_model(info.model_id, feed)
                for _ in range(args.requests // 25):
                    in_process += timed(functools.partial(session.run, None, feed), 25)
                    _recording = True
                    for _ in range(25):
                        client.run_model(info.model_id, feed)
                    _recording = False
                server_events, worker_events = _read_events(folder)
                segments, total, complete = breakdown(_client_events, server_events, worker_events)
                outputs = session.run(None, feed)
                names = [o.name for o in session.get_outputs()]
                body, _ = encode_infer_response(
                    "m", "1", None, dict(zip(names, outputs, strict=True)), set(names), None
                )
                request_bytes = sum(int(a.nbytes) for a in feed.values())
                tls = tls_alone([request_bytes + 400, len(body)])
                report(
                    label, segments, total, complete, statistics.median(in_process), tls, len(body)
                )
                _client_events.clear()  # the server's and worker's files: only windows count
                for name, ms in ort_settings(model, feed, max(20, args.requests // 4)).items():
                    print(f"in-process onnxruntime, {name}: {ms:.3f} ms")
                client.delete_model(info.model_id)


def report(
    label: str,
    segments: list[tuple[str, float]],
    total: float,
    complete: int,
    in_process: float,
    tls: list[float],
    response_bytes: int,
) -> None:
    print(
        f"\n### {label}: median {total:.3f} ms end to end ({complete} requests), "
        f"in-process onnxruntime {in_process:.3f} ms"
    )
    print("| segment | median ms |")
    print("|---|---|")
    for name, ms in segments:
        print(f"| {name} | {ms:.3f} |")
    print(f"| (sum of the medians) | {sum(ms for _, ms in segments):.3f} |")
    print(
        f"TLS alone (memory BIOs, encrypt + decrypt): request {tls[0]:.3f} ms, "
        f"response ({response_bytes} B) {tls[1]:.3f} ms"
    )


if __name__ == "__main__":
    main()
