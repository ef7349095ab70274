"""run_model through the client's fast path (client/pinned_http.py) vs through httpx, on
ONE server, so that only the client differs (bench_fixed_cost.py compares whole trees).

Two attested clients of this tree talk to the same server: "fast" as shipped, "httpx" with
the fast path switched off (its `_send` never takes it), interleaved in blocks so that the
machine's load hits both alike; plus the in-process `session.run` for reference. MLP
64-256-10 batch 1 (nearly all fixed cost) and MiniLM-L6 batch 1 x 128 (a 198 KB answer).

`--canned`: instead of a blindinfer server, a stub TLS server process that answers every
request at once with a stored inference answer of the same size (10 floats; 1 x 128 x 384
floats for MiniLM), so that the difference is the client's own transport cost without
the server's and onnxruntime's noise (the clients trust its certificate directly: no
attestation there).

Run: `.venv/bin/python bench/bench_client_fast_path.py` (`--quick`, `--no-minilm`,
`--server-src DIR`, `--canned`). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_fixed_cost import connect, models, mrenclave_of, server_from  # noqa: E402
from timing import interleaved, machine, percentile  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.client.common import Call  # noqa: E402
from blindinfer.protocol.inference import HEADER_LENGTH, encode_infer_response  # noqa: E402


def without_fast_path(client: blindinfer.Client) -> blindinfer.Client:
    """`client`, its run_model sent through httpx as before the fast path."""
    send = client._send

    def through_httpx(call: Call, *, fast: bool = False) -> httpx.Response:
        return send(call)

    client._send = through_httpx  # type: ignore[method-assign]
    return client


def client_cpu(
    clients: dict[str, blindinfer.Client], model_id: str, feed: dict[str, np.ndarray], count: int
) -> dict[str, list[float]]:
    """Each client's calling-thread CPU ms per run_model (what the client itself spends,
    blind to the server and to waiting), per block of 10, the clients' blocks alternating."""
    blocks: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(max(1, count // 10)):
        for name, client in clients.items():
            start = time.thread_time()
            for _ in range(10):
                client.run_model(model_id, feed)
            blocks[name].append((time.thread_time() - start) * 100)
    return blocks


STUB = """
import socket, ssl, sys, threading
import h11
from blindinfer.server.tls import make_tls_identity

answer = sys.stdin.buffer.read()
identity = make_tls_identity()
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], identity.certificate_der.hex(), flush=True)

def serve(raw):
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with identity.ssl_context.wrap_socket(raw, server_side=True) as tls:
        parser = h11.Connection(h11.SERVER)
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                data = tls.recv(1 << 16)
                if not data:
                    return
                parser.receive_data(data)
            elif isinstance(event, h11.EndOfMessage):
                tls.sendall(answer)
                parser = h11.Connection(h11.SERVER)

while True:
    raw, _ = listener.accept()
    threading.Thread(target=serve, args=(raw,), daemon=True).start()
"""


def canned(rounds: int, minilm: bool) -> None:
    """Both clients against a stub that answers at once (the module docstring)."""
    shapes = {"mlp-64-256-10 b1": (1, 10)}
    if minilm:
        shapes["minilm-l6 b1x128"] = (1, 128, 384)
    for label, _, feed in models(minilm):
        outputs = {"y": np.ones(shapes[label], dtype=np.float32)}
        body, headers = encode_infer_response("m", None, None, outputs, binary={"y"})
        answer = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            b"%s: %s\r\ncontent-length: %d\r\n\r\n"
            % (HEADER_LENGTH.encode(), headers[HEADER_LENGTH].encode(), len(body))
        ) + body
        stub = subprocess.Popen(
            [sys.executable, "-c", STUB], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert stub.stdin is not None and stub.stdout is not None
        stub.stdin.write(answer)
        stub.stdin.close()
        port, certificate = stub.stdout.readline().split()
        attestation: Any = SimpleNamespace(certificate_der=bytes.fromhex(certificate.decode()))
        url = f"https://127.0.0.1:{int(port)}"
        try:
            clients = {
                "httpx": without_fast_path(blindinfer.Client(url, attestation, timeout=30)),
                "fast": blindinfer.Client(url, attestation, timeout=30),
            }
            variants: dict[str, Callable[[], object]] = {
                name: lambda c=c, f=feed: c.run_model("m", f) for name, c in clients.items()
            }
            block = 50
            samples = interleaved(variants, rounds * block, block=block, warmup=3)
            print(f"\n{label}, canned answers ({len(answer)} bytes): median / p99 ms")
            for name, values in samples.items():
                print(
                    f"  {name:<11} {statistics.median(values):8.3f} / {percentile(values, 99):8.3f}"
                )
            fast, slow = (statistics.median(samples[n]) for n in ("fast", "httpx"))
            print(f"  fast path saves {slow - fast:.3f} ms per request ({fast / slow:.2f}x)")
            cpu = client_cpu(clients, "m", feed, rounds * block)
            print(
                "  client thread CPU per request (ms, thread_time, blocks alternating): "
                + ", ".join(f"{name} {statistics.median(v):.3f}" for name, v in cpu.items())
            )
            for c in clients.values():
                c.close()
        finally:
            stub.kill()
            stub.wait()


def src_copy(folder: str) -> str:
    """A copy of this tree's src for the server: the simulated MRENCLAVE hashes that code,
    so edits to the tree during the run would otherwise fail attestation."""
    target = Path(folder) / "src"
    shutil.copytree(ROOT / "src", target, ignore=shutil.ignore_patterns("__pycache__"))
    return str(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument(
        "--server-src",
        help="src folder of the server to run (default: a copy of this tree's): e.g. a clean "
        "`git worktree` of HEAD, so that only the client differs from the base",
    )
    parser.add_argument("--canned", action="store_true", help="a stub server (docstring)")
    args = parser.parse_args()
    rounds = 6 if args.quick else 20
    print(machine())
    if args.canned:
        canned(rounds, not args.no_minilm)
        return
    with tempfile.TemporaryDirectory() as snapshot:
        src = args.server_src or src_copy(snapshot)
        with server_from(src, []) as server:
            run(server.url, mrenclave_of(src), rounds, not args.no_minilm)


def run(url: str, enclave: bytes, rounds: int, minilm: bool) -> None:
    """Both clients against the server at `url`, interleaved (the module docstring)."""
    clients = {
        "httpx": without_fast_path(connect(url, enclave)),
        "fast": connect(url, enclave),
    }
    for label, model, feed in models(minilm):
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        model_id = clients["fast"].upload_model(model, name="m").model_id
        expected = clients["httpx"].run_model(model_id, feed)
        for name, value in clients["fast"].run_model(model_id, feed).items():
            np.testing.assert_array_equal(value, expected[name])
        variants: dict[str, Callable[[], object]] = {
            "in-process": lambda s=session, f=feed: s.run(None, f)
        }
        for name, c in clients.items():
            variants[name] = lambda c=c, m=model_id, f=feed: c.run_model(m, f)
        block = 10 if "minilm" in label else 50
        samples = interleaved(variants, rounds * block, block=block, warmup=3)
        base = statistics.median(samples["in-process"])
        print(f"\n{label}: median / p99 ms, ratio to in-process, difference")
        for name, values in samples.items():
            median = statistics.median(values)
            print(
                f"  {name:<11} {median:8.3f} / {percentile(values, 99):8.3f}   "
                f"{median / base:5.2f}x   +{median - base:6.3f} ms"
            )
        fast, slow = (statistics.median(samples[n]) for n in ("fast", "httpx"))
        print(f"  fast path saves {slow - fast:.3f} ms per request ({fast / slow:.2f}x)")
        cpu = client_cpu(clients, model_id, feed, rounds * block)
        print(
            "  client thread CPU per request (ms, thread_time, blocks alternating): "
            + ", ".join(f"{name} {statistics.median(v):.3f}" for name, v in cpu.items())
        )
        clients["fast"].delete_model(model_id)
    for c in clients.values():
        c.close()


if __name__ == "__main__":
    main()
