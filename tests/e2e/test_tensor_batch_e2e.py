"""`serve --max-tensor-batch 8`: concurrent clients of one tenant each get their own rows
(and a receipt of their own request) back through the server, batched or not."""

from __future__ import annotations

import threading
import warnings

import numpy as np

import blindinfer
from blindinfer.client.receipts import ReceiptedOutputs
from blindinfer.server.config import ServerConfig
from blindinfer.server.process import start_server
from support.onnx_models import mlp_model, mlp_reference, model_bytes

from .conftest import policy_for


def test_concurrent_runs_get_their_own_rows() -> None:
    policy = policy_for(ServerConfig(simulation=True))  # the option is not measured
    with start_server(["--simulation", "--max-tensor-batch", "8"]) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            clients = [
                blindinfer.connect(server.url, policy=policy, simulation=True) for _ in range(6)
            ]
        try:
            sha = clients[0].upload_model(model_bytes(mlp_model())).sha256
            errors: list[BaseException] = []

            def client(i: int) -> None:
                try:
                    for n in range(8):
                        rng = np.random.default_rng(100 * i + n)
                        x = rng.standard_normal((1 + (i + n) % 3, 64)).astype(np.float32)
                        outputs = clients[i].run_model(sha, {"x": x}, receipt=n == 0)
                        np.testing.assert_allclose(
                            outputs["probabilities"], mlp_reference(x), rtol=1e-4, atol=1e-6
                        )
                        if n == 0:
                            assert isinstance(outputs, ReceiptedOutputs)
                            assert outputs.receipt.payload["model"]["sha256"] == sha
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(clients))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == []
        finally:
            for connected in clients:
                connected.close()
