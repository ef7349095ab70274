"""gRPC through the attesting proxy against gRPC direct (pinned), in one run.

One simulation server (`serve --grpc-port`), one proxy process (`blindinfer proxy
--grpc-listen`), this process as the client, unmodified tritonclient throughout. On the
same model (MLP 64-256-10), alternating blocks of 25 so that load drift hits every variant:
  (a) grpc direct: tritonclient.grpc, TLS pinned to the attested certificate -> server
  (b) grpc proxy:  tritonclient.grpc plaintext -> proxy -> pinned TLS -> server
  (c) http proxy:  tritonclient.http (binary tensors) -> proxy -> pinned TLS -> server
at batch 1 and at batch 4096 (1 MiB of input). Prints median and p99, and (b - a): what
the gRPC hop through the proxy adds. Nothing here asserts a time.
Run: `.venv/bin/python bench/bench_proxy_grpc.py` (`--quick` for fewer iterations).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from timing import interleaved, percentile  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.cli.proxy import READY_GRPC_PREFIX, READY_PREFIX  # noqa: E402
from blindinfer.server.config import ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from blindinfer.server.tls import CERTIFICATE_COMMON_NAME  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402
from support import onnx_models  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_policy(path: Path) -> blindinfer.Policy:
    config = ServerConfig(simulation=True)
    path.write_text(
        "[sgx]\n"
        f'mrenclave = ["{simulated_mrenclave(config).hex()}"]\n'
        f'mrsigner = ["{SIMULATION_MRSIGNER.hex()}"]\n'
        "isvprodid = [1]\nmin_isvsvn = 1\n"
    )
    return blindinfer.load_policy(path)


def start_proxy(upstream: str, policy_path: Path) -> tuple[subprocess.Popen[str], str, str]:
    command = [
        sys.executable,
        "-m",
        "blindinfer.cli.proxy",
        "--policy",
        str(policy_path),
        "--upstream",
        upstream,
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        f"127.0.0.1:{free_port()}",
        "--simulation",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    http_line = process.stdout.readline()
    grpc_line = process.stdout.readline()
    if not http_line.startswith(READY_PREFIX) or not grpc_line.startswith(READY_GRPC_PREFIX):
        process.kill()
        raise RuntimeError(f"the proxy did not start: {http_line!r} {grpc_line!r}")
    http_url = http_line[len(READY_PREFIX) :].split(" ")[0]
    return process, http_url.split("://", 1)[1], grpc_line[len(READY_GRPC_PREFIX) :].split()[0]


def grpc_call(client: Any, x: np.ndarray) -> Callable[[], object]:
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    outputs = [grpcclient.InferRequestedOutput("probabilities")]
    return lambda: client.infer("mlp", [tensor], outputs=outputs).as_numpy("probabilities")


def http_call(client: Any, x: np.ndarray) -> Callable[[], object]:
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    return lambda: client.infer("mlp", [tensor], outputs=outputs).as_numpy("probabilities")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    n = 100 if args.quick else 400
    warnings.simplefilter("ignore", blindinfer.SimulationWarning)
    grpc_port = free_port()
    with (
        tempfile.TemporaryDirectory() as folder,
        start_server(["--simulation", "--grpc-port", str(grpc_port)]) as server,
    ):
        policy = write_policy(Path(folder) / "policy.toml")
        verified = blindinfer.attest(server.url, policy=policy, simulation=True)
        pem = Path(folder) / "pinned.pem"
        pem.write_bytes(
            x509.load_der_x509_certificate(verified.certificate_der).public_bytes(
                serialization.Encoding.PEM
            )
        )
        process, http_address, grpc_address = start_proxy(server.url, Path(folder) / "policy.toml")
        direct = grpcclient.InferenceServerClient(
            f"127.0.0.1:{grpc_port}",
            ssl=True,
            root_certificates=str(pem),
            channel_args=[("grpc.ssl_target_name_override", CERTIFICATE_COMMON_NAME)],
        )
        proxied = grpcclient.InferenceServerClient(grpc_address)
        proxied_http = httpclient.InferenceServerClient(http_address)
        try:
            model = onnx_models.model_bytes(onnx_models.mlp_model())
            proxied.load_model("mlp", files={"file:1/model.onnx": model})
            rng = np.random.default_rng(0)
            for batch in (1, 4096):
                x = rng.standard_normal((batch, 64)).astype(np.float32)
                variants = {
                    "grpc direct": grpc_call(direct, x),
                    "grpc proxy": grpc_call(proxied, x),
                    "http proxy": http_call(proxied_http, x),
                }
                count = n if batch == 1 else n // 4
                results = interleaved(variants, count)
                print(f"MLP 64-256-10 batch {batch} ({x.nbytes} input bytes), {count} each")
                for name, samples in results.items():
                    print(
                        f"  {name:12s} median {statistics.median(samples):7.3f} ms"
                        f"  p99 {percentile(samples, 99):7.3f} ms"
                    )
                added = statistics.median(results["grpc proxy"]) - statistics.median(
                    results["grpc direct"]
                )
                print(f"  the proxy's gRPC hop adds {added:+.3f} ms (median)")
            proxied.unload_model("mlp")
        finally:
            direct.close()
            proxied.close()
            proxied_http.close()
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
