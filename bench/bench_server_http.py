"""The server's HTTP path alone, before and after: the ASGI app of two trees side by side.

Each tree runs in a process of its own (PYTHONPATH), builds the real app (simulation
platform, open mode), uploads the MLP 64-256-10 through it, then replaces the model's run
(`ModelRegistry.run_async`) with one that returns fixed outputs: what is left is exactly
the app's own per-request work (middlewares, routing, auth, model lookup, reading the
body, parsing, encoding, the response) on a real event loop (uvloop), without sockets,
TLS, uvicorn's parser or the worker. The processes are driven alternately in blocks, so
the machine's load hits both alike; the table gives each one's median per request.

With `--e2e`: the whole request instead, through attested TLS, one server process per
tree and the same client (this tree's) for both, the MLP at batch 1, interleaved in
blocks (bench_fixed_cost.py's base client sends as before client/coalesce.py, so its
base/tree ratio also holds the client's change; this one holds only the server's).

Run: `.venv/bin/python bench/bench_server_http.py --base-src /tmp/base/src [--tree-src
DIR] [--e2e]`. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, json, sys, time, warnings
sys.path.insert(0, sys.argv[1])
import numpy as np, uvloop
from starlette.testclient import TestClient
from support import onnx_models
from blindinfer.protocol.inference import encode_infer_request
from blindinfer.server.app import build_state, create_app
from blindinfer.server.config import ServerConfig
from blindinfer.server.tls import make_tls_identity
from blindinfer.tee.simulation.platform import SimulationPlatform

warnings.simplefilter("ignore")
config = ServerConfig(simulation=True)
state = build_state(config, SimulationPlatform(bytes(32)), make_tls_identity())
app = create_app(state)
with TestClient(app) as tc:
    uploaded = tc.put(
        "/v2/repository/models/m/upload",
        content=onnx_models.model_bytes(onnx_models.mlp_model()),
        headers={"content-type": "application/octet-stream"},
    )
    assert uploaded.status_code in (200, 201), uploaded.text
OUT = {"y": np.zeros((1, 10), np.float32)}
async def fixed_run(record, inputs, wanted=None, **kw):
    return OUT
state.registry.run_async = fixed_run
body, headers = encode_infer_request({"x": np.ones((1, 64), np.float32)}, binary=True)
head = [(b"host", b"127.0.0.1:1"), (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"), (b"user-agent", b"python-httpx/0.28.1")]
head += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
head.append((b"content-length", str(len(body)).encode()))
SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
         "http_version": "1.1", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
         "scheme": "https", "method": "POST", "root_path": "", "path": "/v2/models/m/infer",
         "raw_path": b"/v2/models/m/infer", "query_string": b"", "headers": head, "state": {}}

async def one() -> int:
    sent = []
    done = asyncio.Event()
    first = True
    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}
    async def send(message):
        sent.append(message)
    await app({**SCOPE, "headers": list(head), "state": {}}, receive, send)
    done.set()
    return sent[0]["status"]

async def serve():
    assert await one() == 200, "the request failed"
    loop = asyncio.get_running_loop()
    for line in sys.stdin:
        n = int(line)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await one()
            times.append(time.perf_counter() - t)
        print(json.dumps(times), flush=True)

uvloop.run(serve())
"""


def start(src: str | None) -> subprocess.Popen[str]:
    env = {**os.environ}
    if src is not None:
        env["PYTHONPATH"] = src
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(ROOT / "tests")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def e2e(base_src: str, tree_src: str | None, rounds: int, block: int) -> None:
    """Both servers, the same client, the MLP: median and p90 per tree."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "bench"))
    from contextlib import ExitStack

    import numpy as np
    from bench_fixed_cost import concurrent_rps, connect, mrenclave_of, server_from
    from timing import interleaved

    from support import onnx_models

    model = onnx_models.model_bytes(onnx_models.mlp_model())
    feed = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}
    sources = {"base": base_src, "tree": tree_src}
    with ExitStack() as stack:
        variants = {}
        rates: dict[str, tuple[str, bytes, str, list[float]]] = {}
        for name, src in sources.items():
            server = stack.enter_context(server_from(src, []))
            enclave = mrenclave_of(src)
            client = stack.enter_context(connect(server.url, enclave))
            ref = client.upload_model(model, name="m").model_id
            variants[name] = lambda c=client, r=ref: c.run_model(r, feed)
            rates[name] = (server.url, enclave, ref, [])
        ms = interleaved(variants, rounds * block, block=block, warmup=3)
        report({name: [t / 1000 for t in values] for name, values in ms.items()})
        for _ in range(3):  # 8 clients, one attested connection each, alternating
            for url, enclave, ref, found in rates.values():
                found.append(concurrent_rps(url, enclave, True, ref, feed, 2.0))
    for name, (_, _, _, found) in rates.items():
        shown = ", ".join(f"{r:.0f}" for r in found)
        print(f"  8 clients on {name}: median {statistics.median(found):7.1f} req/s ({shown})")


def report(samples: dict[str, list[float]]) -> None:
    """Median and p90 per tree, in ms (`samples` in seconds)."""
    base = statistics.median(samples["base"])
    print(f"load average {os.getloadavg()[0]:.2f}; ms per request, {len(samples['base'])} each")
    for name, values in samples.items():
        median = statistics.median(values)
        p90 = sorted(values)[int(0.9 * len(values))]
        print(
            f"  {name:<5} median {1000 * median:6.3f}  p90 {1000 * p90:6.3f}  {median / base:5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-src", required=True, help="src folder of the code before")
    parser.add_argument("--tree-src", help="src folder of the code measured (default: this tree)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=200)
    parser.add_argument("--e2e", action="store_true", help="whole requests through TLS")
    args = parser.parse_args()
    if args.e2e:
        e2e(args.base_src, args.tree_src, args.rounds, min(args.block, 50))
        return
    children = {"base": start(args.base_src), "tree": start(args.tree_src)}
    samples: dict[str, list[float]] = {name: [] for name in children}
    try:
        for round_ in range(args.rounds + 1):
            for name, child in children.items():
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write(f"{args.block}\n")
                child.stdin.flush()
                times = json.loads(child.stdout.readline())
                if round_:  # the first round warms up
                    samples[name].extend(times)
    finally:
        for child in children.values():
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=30)
    report(samples)


if __name__ == "__main__":
    main()
