"""The unmodified BlindAI Core 0.6.3 client from PyPI against blindinfer's compat ports.

The listeners run in this process over a real `build_state` (worker processes, sealed
store, simulation platform) and real sockets; the BlindAI client runs in a subprocess
whose environment has no REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (they would replace the
certificate it pins). `blindai` is installed without its dependencies; its audio module
(whisper, transformers) is stubbed, since `blindai.core` never uses it. With numpy 1.25+
the client only understands flat lists with explicit `dtypes` and `shapes`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from blindinfer.cli.demo_model import demo_input, demo_model
from blindinfer.server.app import build_state, close_state
from blindinfer.server.blindai import BlindAiListeners
from blindinfer.server.config import ServerConfig
from blindinfer.server.platforms import select_platform
from blindinfer.server.tls import make_tls_identity

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("blindai") is None or importlib.util.find_spec("cbor2") is None,
    reason="blindai 0.6.3 is not installed: pip install --no-deps blindai==0.6.3 "
    "'cbor2<6' requests toml importlib-metadata typing-extensions "
    "sgx-dcap-quote-verify-python",
)

CLIENT_PRELUDE = """
import sys, types
audio = types.ModuleType("blindai.audio")  # needs whisper/transformers; unused by core
audio.Audio = None
sys.modules["blindai.audio"] = audio
try:
    import torch  # noqa: F401  (blindai.utils imports it at top level)
except ImportError:
    sys.modules["torch"] = types.ModuleType("torch")
import json, warnings
import numpy as np
import requests
import blindai.core as core
"""


@pytest.fixture(scope="module")
def listeners() -> Iterator[BlindAiListeners]:
    config = ServerConfig(simulation=True)
    state = build_state(config, select_platform(config), make_tls_identity())
    running = BlindAiListeners(state, "127.0.0.1", (0, 0, 0))
    running.start()
    try:
        yield running
    finally:
        running.stop()
        close_state(state)


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _run_client(body: str, ports: tuple[int, ...], tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "client.py"
    script.write_text(
        CLIENT_PRELUDE
        + f"PORTS = {list(ports)!r}\n"
        + "def connect(simulation_mode=True):\n"
        + "    return core.connect('127.0.0.1', PORTS[0], PORTS[1], PORTS[2],\n"
        + "        hazmat_http_on_unattested_port=True, simulation_mode=simulation_mode)\n"
        + textwrap.dedent(body)
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        env=_client_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _reference(model: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def test_upload_run_delete_with_stock_client(listeners: BlindAiListeners, tmp_path: Path) -> None:
    model = demo_model()
    (tmp_path / "model.onnx").write_bytes(model)
    inputs = demo_input(batch=3)
    ((name, array),) = inputs.items()
    np.save(tmp_path / "input.npy", array)
    (tmp_path / "input-name.txt").write_text(name)
    expected = _reference(model, inputs)

    result = _run_client(
        """
        x = np.load("input.npy")
        NAME = open("input-name.txt").read()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            conn = connect()
        sim_warned = any("simulation" in str(w.message) for w in caught)
        up = conn.upload_model("model.onnx")
        flat = dict(input_tensors=[x.flatten().tolist()], dtypes=[core.ModelDatumType.F32],
                    shapes=[list(x.shape)])
        by_id = conn.run_model(model_id=up.model_id, **flat)
        by_hash = conn.run_model(model_hash=up.hash.hex(), **flat)
        named = conn.run_model(model_id=up.model_id, input_tensors={NAME: x.flatten().tolist()},
                               dtypes={NAME: core.ModelDatumType.F32},
                               shapes={NAME: list(x.shape)})
        outputs = {}
        for label, reply in (("id", by_id), ("hash", by_hash), ("named", named)):
            for i, t in enumerate(reply.output):
                a = t.as_numpy()
                np.save(f"{label}-{i}.npy", a)
                outputs.setdefault(label, []).append([t.info.node_name, int(t.info.datum_type)])
        conn.delete_model(up.model_id)
        try:
            conn.run_model(model_id=up.model_id, **flat)
            after_delete = "ran"
        except requests.HTTPError as e:
            after_delete = e.response.status_code
        try:
            connect(simulation_mode=False)
            refused = False
        except core.AttestationError as e:
            refused = "mock" in str(e)
        print(json.dumps({"model_id": up.model_id, "hash": up.hash.hex(), "outputs": outputs,
                          "after_delete": after_delete, "sim_warned": sim_warned,
                          "refused_without_simulation": refused}))
        """,
        listeners.ports,
        tmp_path,
    )
    assert result["hash"] == hashlib.sha256(model).hexdigest()
    uuid.UUID(result["model_id"])  # BlindAI clients get UUIDs
    assert result["sim_warned"]
    assert result["refused_without_simulation"]
    assert result["after_delete"] == 404
    for label in ("id", "hash", "named"):
        described = result["outputs"][label]
        assert [n for n, _ in described] == list(expected)
        for i, (output_name, _) in enumerate(described):
            got = np.load(tmp_path / f"{label}-{i}.npy")
            want = expected[output_name]
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want), (label, output_name)  # bit for bit


def test_errors_reach_the_stock_client_as_http_errors(
    listeners: BlindAiListeners, tmp_path: Path
) -> None:
    result = _run_client(
        """
        conn = connect()
        codes = {}
        for label, call in (
            ("unknown_id", lambda: conn.run_model(model_id="00000000-0000-0000-0000-000000000000",
                input_tensors=[[1.0]], dtypes=[core.ModelDatumType.F32], shapes=[[1]])),
            ("unknown_hash", lambda: conn.run_model(model_hash="ab" * 32,
                input_tensors=[[1.0]], dtypes=[core.ModelDatumType.F32], shapes=[[1]])),
            ("delete_unknown", lambda: conn.delete_model("not-a-uuid")),
        ):
            try:
                call()
                codes[label] = 200
            except requests.HTTPError as e:
                codes[label] = [e.response.status_code, e.response.headers.get("Server")]
        with open("bad.onnx", "wb") as f:
            f.write(b"this is not onnx")
        try:
            conn.upload_model("bad.onnx")
        except requests.HTTPError as e:
            codes["bad_model"] = [e.response.status_code, e.response.headers.get("Server")]
        print(json.dumps(codes))
        """,
        listeners.ports,
        tmp_path,
    )
    mock = "blindai mock (testing)"
    assert result == {
        "unknown_id": [404, mock],
        "unknown_hash": [404, mock],
        "delete_unknown": [404, mock],
        "bad_model": [400, mock],
    }
