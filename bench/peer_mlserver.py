"""The established serving stack beside blindinfer in bench/bench_inference.py: MLServer 1.7.

MLServer runs from its own virtualenv (bench/requirements-mlserver.txt says why and how to
create it) as a subprocess, with the ONNX runtime of bench/mlserver_onnxruntime.py, on
plain HTTP on loopback, with its defaults (one parallel inference worker process, as
blindinfer's worker processes). The client speaks the V2 / Open Inference Protocol in
JSON: MLServer's REST API has no binary tensor extension (its gRPC API is the binary one),
so JSON is what a REST client of MLServer sends and receives.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

RUNTIME = "mlserver_onnxruntime.OnnxRuntimeModel"
_DATATYPES: dict[np.dtype[Any], str] = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
}
_DTYPES: dict[str, np.dtype[Any]] = {name: dtype for dtype, name in _DATATYPES.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mlserver(python: Path, models: Mapping[str, bytes], timeout: float = 120.0) -> Iterator[str]:
    """Serves `models` (name -> ONNX bytes) with the `mlserver` beside `python`; yields its URL."""
    root = Path(tempfile.mkdtemp(prefix="bench-mlserver-"))
    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    (root / "settings.json").write_text(
        json.dumps(
            {"host": "127.0.0.1", "http_port": http, "grpc_port": grpc, "metrics_port": metrics}
        )
    )
    for name, data in models.items():
        folder = root / name
        folder.mkdir()
        (folder / "model.onnx").write_bytes(data)
        (folder / "model-settings.json").write_text(
            json.dumps(
                {"name": name, "implementation": RUNTIME, "parameters": {"uri": "model.onnx"}}
            )
        )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    log = (root / "mlserver.log").open("w")
    # the `mlserver` console script beside the interpreter (the package has no __main__)
    # cwd: MLServer writes its Prometheus files into ./.metrics; keep them in the temp folder
    process = subprocess.Popen(
        [str(python.parent / "mlserver"), "start", str(root)],
        stdout=log,
        stderr=log,
        env=env,
        cwd=root,
    )
    url = f"http://127.0.0.1:{http}"
    try:
        _wait_ready(url, list(models), process, timeout, root / "mlserver.log")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(
    url: str, names: list[str], process: subprocess.Popen[bytes], timeout: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"MLServer exited: {log.read_text()[-2000:]}")
            try:
                if all(client.get(f"/v2/models/{n}/ready").status_code == 200 for n in names):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"MLServer did not get ready: {log.read_text()[-2000:]}")


class MLServerClient:
    """A V2 JSON client on one keep-alive HTTP connection (httpx, as blindinfer's client)."""

    def __init__(self, url: str) -> None:
        self._client = httpx.Client(base_url=url, timeout=60.0)

    def infer(
        self,
        model: str,
        feed: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """The model's outputs (`outputs`: only those, as the V2 request's `outputs` asks)."""
        request: dict[str, object] = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": _DATATYPES[array.dtype],
                    "data": array.reshape(-1).tolist(),
                }
                for name, array in feed.items()
            ]
        }
        if outputs:
            request["outputs"] = [{"name": name} for name in outputs]
        body = json.dumps(request)
        response = self._client.post(
            f"/v2/models/{model}/infer",
            content=body,
            headers={"content-type": "application/json"},
        )
        response.raise_for_status()
        return {
            out["name"]: np.asarray(out["data"], dtype=_DTYPES[str(out["datatype"])]).reshape(
                out["shape"]
            )
            for out in response.json()["outputs"]
        }

    def server_version(self) -> str:
        """What the server says it is (V2 server metadata), for the table's footnote."""
        document = self._client.get("/v2").json()
        return f"{document.get('name')} {document.get('version')}"

    def close(self) -> None:
        self._client.close()
