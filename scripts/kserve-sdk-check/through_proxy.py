"""The KServe SDK's gRPC client through the attesting proxy (scripts/check-kserve-sdk.sh).

Starts a simulated server with `--grpc-port` and an attesting proxy with a gRPC listener,
uploads a model through the proxy with tritonclient.grpc, then runs the KServe SDK's
`InferenceGRPCClient` (in its own virtualenv, argv[1]: the SDK pins packages this one does
not share) through the proxy, and compares its outputs with onnxruntime in process, byte
for byte. Exit 0 only when every output is equal.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests")]

from blindinfer.proxy.forward import ProxyConfig, RunningProxy  # noqa: E402
from blindinfer.server.config import ServerConfig  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from e2e.conftest import policy_for  # noqa: E402
from support import onnx_models as zoo  # noqa: E402

MODEL_NAME = "kserve-sdk-check"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main(kserve_python: str) -> int:
    model = zoo.model_bytes(zoo.multi_io_model())
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    inputs = {
        i.name: [i.type, [d if isinstance(d, int) else 2 for d in i.shape]]
        for i in session.get_inputs()
    }
    with start_server(["--simulation", "--grpc-port", str(free_port())]) as server:
        config = ProxyConfig(
            upstream=server.url,
            policy=policy_for(ServerConfig(simulation=True)),
            simulation=True,
            grpc_listen=("127.0.0.1", 0),
        )
        with RunningProxy(config) as proxy:
            uploader = triton.InferenceServerClient(f"127.0.0.1:{proxy.grpc_port}")
            uploader.load_model(MODEL_NAME, files={"file:1/model.onnx": model})
            spec = json.dumps({"port": proxy.grpc_port, "model": MODEL_NAME, "inputs": inputs})
            run = subprocess.run(
                [kserve_python, str(Path(__file__).with_name("kserve_client.py")), spec],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            uploader.unload_model(MODEL_NAME)
    print(run.stderr.strip())
    if run.returncode != 0:
        print("the KServe SDK's client failed", file=sys.stderr)
        return 1
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    feed = {n: np.asarray(v, dtype=t).reshape(s) for n, (v, t, s) in answer["feed"].items()}
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(names, feed), strict=True))
    equal = True
    for name, (values, dtype, shape) in answer["out"].items():
        same = np.asarray(values, dtype=dtype).reshape(shape).tobytes() == want[name].tobytes()
        print(f"output {name}: {'equal' if same else 'DIFFERENT'} to onnxruntime in process")
        equal = equal and same
    equal = equal and sorted(answer["out"]) == sorted(want)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
