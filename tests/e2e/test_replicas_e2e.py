"""Three replicas behind HAProxy (TCP mode: TLS ends in each replica, each has its own key).

- `connect()` as for one server (replicas=1) meets a second replica's key: KeyBindingError,
  whose message says to pass replicas=N; nothing was sent to that replica.
- `connect(replicas=3)`: many requests from 8 threads all succeed, each answer's receipt
  verifies against the key of the connection that carried it, and that key was attested
  (on that connection, before the request): `client.attested_keys` holds the 3 replicas;
  so does an AsyncClient's after concurrent requests; the openai SDK's client answers.
- kill -9 one replica while requests are in flight and start a new one on its port (a new
  key): every request succeeded (retried on a new connection) or failed with the
  retryable ConnectionFailedError; the new replica's key is attested (4 keys seen over the
  run, at most 3 held); the model uploaded before the kill (acknowledged) still runs on
  every replica, the new one included, asked directly on its own port; so does one
  uploaded through the balancer after the restart.
- the attesting proxy with `ProxyConfig(replicas=3)` before the balancer: plain-HTTP
  callers from 8 threads all answered, the proxy holds the 3 replicas' keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import blindinfer
from blindinfer.client import pinned_http
from blindinfer.client.receipts import ReceiptedOutputs
from blindinfer.errors import ConnectionFailedError, KeyBindingError
from blindinfer.proxy.forward import ProxyConfig, RunningProxy
from blindinfer.server.config import Limits, ServerConfig
from support.onnx_models import mlp_model, model_bytes
from support.replicas import ReplicaSet, haproxy_available, replica_set

from .conftest import policy_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        not haproxy_available(), reason="needs haproxy (scripts/test.sh installs it)"
    ),
]

THREADS = 8
POLICY = policy_for(ServerConfig(simulation=True, limits=Limits(workers=1)))


def _connect(url: str, replicas: int = 1) -> blindinfer.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(
            url, policy=POLICY, simulation=True, replicas=replicas, timeout=30
        )


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[ReplicaSet]:
    with replica_set(tmp_path / "store", 3, ["--workers=1"]) as running:
        yield running


def _digest(certificate: bytes) -> str:
    return hashlib.sha256(certificate).hexdigest()[:16]


class Load:
    """THREADS threads running the model with receipts until stopped; every outcome kept."""

    def __init__(self, client: blindinfer.Client, model: str, x: np.ndarray) -> None:
        self.client, self.model, self.x = client, model, x
        self.outcomes: Counter[str] = Counter()
        self.keys: set[str] = set()
        self.expected = client.run_model(model, {"x": x})["probabilities"]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(THREADS)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.client.run_model(self.model, {"x": self.x}, receipt=True)
            except ConnectionFailedError:
                outcome, key = "ConnectionFailedError", None
            except Exception as exc:  # any other failure fails the test below, by name
                outcome, key = f"{type(exc).__name__}: {exc}", None
            else:
                assert isinstance(answer, ReceiptedOutputs)
                np.testing.assert_allclose(answer["probabilities"], self.expected, rtol=1e-6)
                outcome = "ok"
                key = _digest(answer.receipt.certificate_der)
            with self._lock:
                self.outcomes[outcome] += 1
                if key is not None:
                    self.keys.add(key)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def run_for(self, seconds: float) -> None:
        self.start()
        time.sleep(seconds)
        self.stop()


async def _async_keys(url: str, x: np.ndarray) -> int:
    """An AsyncClient with replicas=3: 24 concurrent requests open connections to all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        connecting = blindinfer.AsyncClient.connect(
            url, policy=POLICY, simulation=True, replicas=3, timeout=30
        )
        async with connecting as client:
            await asyncio.gather(*(client.run_model("mlp", {"x": x}) for _ in range(24)))
            return len({k.certificate_der for k in client.attested_keys})


def test_a_pinned_client_meets_another_replica_and_is_told_about_replicas(
    replicas: ReplicaSet,
) -> None:
    """The discovery connection lands on one replica; a later one on another (round robin)."""

    def first_refusal() -> KeyBindingError | None:
        for _ in range(6):
            with _connect(replicas.url) as client:
                try:
                    client.list_models()
                except KeyBindingError as exc:
                    return exc
        return None

    refusal = first_refusal()
    assert refusal is not None
    assert "connect(..., replicas=N)" in str(refusal)


def test_replicas_are_attested_one_by_one_and_a_killed_one_is_replaced(
    replicas: ReplicaSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # idle connections expire fast, so that a later burst opens new ones (round robin)
    monkeypatch.setattr(pinned_http, "KEEPALIVE_EXPIRY", 0.3)
    client = _connect(replicas.url, replicas=3)
    info = client.upload_model(model_bytes(mlp_model()), name="mlp", receipt=True)
    assert info.receipt is not None
    x = np.ones((1, 64), dtype=np.float32)

    load = Load(client, "mlp", x)
    load.run_for(3.0)
    assert set(load.outcomes) == {"ok"}, load.outcomes
    attested = {_digest(k.certificate_der) for k in client.attested_keys}
    assert len(attested) == 3
    assert load.keys <= attested  # every answer came over an attested replica's key
    answer = client.run_model("mlp", {"x": x}, receipt=True)
    assert isinstance(answer, ReceiptedOutputs)
    # an answer whose connection is unknown (the openai SDK's): each attested key is tried
    signer = client._check_receipt(answer.receipt.jws, "inference")
    assert signer.certificate_der == answer.receipt.certificate_der
    assert asyncio.run(_async_keys(replicas.url, x)) == 3
    assert client.openai().models.list() is not None  # the SDK's pool passes the same check

    # kill -9 a replica while requests are in flight, start a new one on its port
    load = Load(client, "mlp", x)
    load.start()
    time.sleep(1.0)
    replicas.kill(1)
    time.sleep(0.5)
    replicas.start(1)
    time.sleep(1.0)
    load.stop()
    assert set(load.outcomes) <= {"ok", "ConnectionFailedError"}, load.outcomes
    assert load.outcomes["ok"] > 0

    time.sleep(0.5)  # every pooled connection expires: the next ones spread over all three
    late = Load(client, "mlp", x)
    late.run_for(2.0)
    assert set(late.outcomes) == {"ok"}, late.outcomes
    now = {_digest(k.certificate_der) for k in client.attested_keys}
    assert len(now) <= 3
    seen = attested | now | load.keys | late.keys
    assert len(seen) == 4, "the new replica's key was attested"
    assert late.keys <= now

    # nothing acknowledged was lost; an upload after the restart is on every replica too
    after = client.upload_model(model_bytes(mlp_model(seed=1)), name="mlp-after")
    for index in range(3):
        with _connect(replicas.direct_url(index)) as direct:
            assert direct.run_model("mlp", {"x": x})["probabilities"].shape == load.expected.shape
            assert direct.run_model(after.model_id, {"x": x})["probabilities"].shape[0] == 1
    client.close()


def test_the_proxy_attests_each_replica_behind_the_balancer(replicas: ReplicaSet) -> None:
    """`ProxyConfig(replicas=3)`: plain-HTTP callers, every replica attested by the proxy."""
    with _connect(replicas.url, replicas=3) as client:
        client.upload_model(model_bytes(mlp_model()), name="mlp")
    config = ProxyConfig(upstream=replicas.url, policy=POLICY, simulation=True, replicas=3)
    with RunningProxy(config) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as local:
        statuses: list[int] = []

        def get(_: int) -> None:
            with httpx.Client(base_url=proxy.url, timeout=30) as own:
                statuses.extend(own.get("/v2/models/mlp").status_code for _ in range(10))

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(get, range(THREADS)))
        assert statuses == [200] * THREADS * 10
        status = local.get("/blindinfer/proxy").json()
    assert status["attested"] is True
    assert status["attested_keys"] == 3
