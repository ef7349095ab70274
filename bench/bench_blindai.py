"""BlindAI Core 0.6.3's own client against blindinfer's own client, same server, same model.

One simulation server with `--blindai-compat`; one client process runs both clients on the
demo classifier (16 features, batch 1), alternating blocks of 25 runs, and prints median
and p99 for each. Run: `.venv/bin/python bench/bench_blindai.py` (needs `pip install
--no-deps blindai==0.6.3`, as scripts/test.sh does). Nothing is asserted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from blindinfer.server.process import start_server

CLIENT = """
import sys, types, json, time, statistics, warnings
audio = types.ModuleType("blindai.audio"); audio.Audio = None; sys.modules["blindai.audio"] = audio
import numpy as np
import blindai.core as core
import blindinfer
from blindinfer.cli.demo_model import demo_input, demo_model
from blindinfer.server.config import ServerConfig
from blindinfer.server.platforms import simulated_mrenclave
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER

URL, PORTS = sys.argv[1], [int(p) for p in sys.argv[2].split(",")]
warnings.simplefilter("ignore")
theirs = core.connect("127.0.0.1", PORTS[0], PORTS[1], PORTS[2],
                      hazmat_http_on_unattested_port=True, simulation_mode=True)
mrenclave = simulated_mrenclave(ServerConfig(simulation=True, blindai_compat=True))
policy = blindinfer.Policy(sgx=blindinfer.SgxPolicy(mrenclave=(mrenclave,), mrsigner=(SIMULATION_MRSIGNER,)))
ours = blindinfer.connect(URL, policy=policy, simulation=True)
model = demo_model()
open("m.onnx", "wb").write(model)
up = theirs.upload_model("m.onnx")
mine = ours.upload_model(model, name="bench")
x = demo_input(batch=1)["features"]
flat = dict(input_tensors=[x.flatten().tolist()], dtypes=[core.ModelDatumType.F32], shapes=[list(x.shape)])

def timed(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append((time.perf_counter() - t) * 1000)
    return out

a, b = [], []
for _ in range(3): theirs.run_model(model_id=up.model_id, **flat); ours.run_model(mine.model_id, {"features": x})
for _ in range(N_BLOCKS):
    a += timed(lambda: theirs.run_model(model_id=up.model_id, **flat), 25)
    b += timed(lambda: ours.run_model(mine.model_id, {"features": x}), 25)
p99 = lambda s: sorted(s)[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
print(json.dumps({"blindai": [statistics.median(a), p99(a)], "blindinfer": [statistics.median(b), p99(b)]}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    quick = "--quick" in sys.argv
    ports = ",".join(str(free_port()) for _ in range(3))
    with (
        start_server(["--simulation", "--blindai-compat", f"--blindai-ports={ports}"]) as server,
        tempfile.TemporaryDirectory() as tmp,
    ):
        script = Path(tmp) / "client.py"
        script.write_text(textwrap.dedent(CLIENT).replace("N_BLOCKS", "4" if quick else "12"))
        env = {
            k: v for k, v in os.environ.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
        }
        env["NO_PROXY"] = "127.0.0.1,localhost"
        done = subprocess.run(
            [sys.executable, str(script), server.url, ports],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    if done.returncode != 0:
        print(done.stderr[-2000:])
        raise SystemExit(1)
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    print("demo classifier (16 -> 32 -> 4), batch 1, same server, alternating blocks of 25")
    for label, (median, p99) in result.items():
        print(f"  {label:<11} median {median:7.3f} ms   p99 {p99:7.3f} ms")
    print(
        f"  ratio blindai / blindinfer (medians): {result['blindai'][0] / result['blindinfer'][0]:.2f}"
    )


if __name__ == "__main__":
    main()
