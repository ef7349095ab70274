"""A server that hostile clients cannot exhaust or crash (BlindAI audit LOW 1, INFO 3, INFO 4).

Real server processes, real worker processes, real sealed storage on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

import blindinfer
from blindinfer.client.transport import pinned_context
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support import hostile_models, onnx_models, procmem

from .conftest import policy_for

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def _server_args(limits: Limits, *extra: str) -> list[str]:
    return [
        "--simulation",
        f"--max-model-bytes={limits.max_model_bytes}",
        f"--max-request-bytes={limits.max_request_bytes}",
        f"--max-models={limits.max_models}",
        f"--memory-budget-bytes={limits.memory_budget_bytes}",
        f"--max-stored-bytes={limits.max_stored_bytes}",
        f"--workers={limits.workers}",
        f"--worker-memory-bytes={limits.worker_memory_bytes}",
        f"--inference-timeout-ms={limits.inference_timeout_ms}",
        *extra,
    ]


def _connect(server: ServerProcess, limits: Limits) -> blindinfer.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(
            server.url,
            policy=policy_for(ServerConfig(simulation=True, limits=limits)),
            simulation=True,
        )


def _stats(client: blindinfer.Client) -> dict[str, object]:
    with httpx.Client(verify=pinned_context(client.attestation.certificate_der)) as raw:
        document: dict[str, object] = raw.get(client.url + "/v2/admin/stats").json()
        return document


def _distilbert_sized_variant(base: onnx.ModelProto, index: int) -> bytes:
    """The audit's proof of concept: the same model, only its doc_string changed."""
    variant = onnx.ModelProto()
    variant.CopyFrom(base)
    variant.doc_string = f"variant {index}"
    return variant.SerializeToString()


POC_LIMITS = Limits(
    max_model_bytes=128 * MiB,
    max_models=32,
    memory_budget_bytes=160 * MiB,
    max_stored_bytes=2048 * MiB,
    workers=1,
    worker_memory_bytes=4096 * MiB,
)


def test_audit_proof_of_concept_stays_within_the_memory_budget(tmp_path: Path) -> None:
    """13 uploads of a 48 MiB model differing only in doc_string (BlindAI audit, LOW 1)."""
    base = onnx.load_from_string(hostile_models.large_initializer_model(48 * MiB))
    args = _server_args(POC_LIMITS, f"--store-dir={tmp_path / 'store'}")
    with start_server(args) as server, _connect(server, POC_LIMITS) as client:
        warm = client.upload_model(onnx_models.model_bytes(onnx_models.mlp_model()), name="warm")
        client.run_model(warm.model_id, {"x": np.ones((1, 64), np.float32)})
        client.delete_model(warm.model_id)
        baseline = procmem.rss_bytes(server.process.pid)  # server and workers, warmed up
        x = np.ones(48 * MiB // 4, np.float32)
        uploaded = []
        peak = baseline
        for index in range(13):
            info = client.upload_model(_distilbert_sized_variant(base, index), name=f"poc-{index}")
            uploaded.append(info)
            stats = _stats(client)
            assert stats["memory_used_bytes"] <= POC_LIMITS.memory_budget_bytes  # type: ignore[operator]
            peak = max(peak, procmem.rss_bytes(server.process.pid))
        assert len({i.sha256 for i in uploaded}) == 13
        # every acknowledged model still runs, evicted ones are reloaded transparently
        expected = None
        for info in [uploaded[0], *uploaded[1:], uploaded[0]]:
            y = client.run_model(info.model_id, {"x": x})["y"]
            expected = y if expected is None else expected
            assert np.array_equal(y, expected)
            peak = max(peak, procmem.rss_bytes(server.process.pid))
        stats = _stats(client)
        assert stats["models"] == 13
        assert stats["loaded"] < 13  # evictions happened
        assert stats["memory_used_bytes"] <= POC_LIMITS.memory_budget_bytes  # type: ignore[operator]
        # resident memory: what it was before the first upload, plus the budget, plus the
        # transient buffers of one upload (body and its copy, the worker's copy and parse
        # while it builds the session) and of one inference (request, input, output, reply
        # and its encoding): eight model-sized buffers at most. Without the budget the 13
        # sessions alone would add 624 MiB on top of those.
        stated_base = 8 * 48 * MiB
        assert peak <= baseline + POC_LIMITS.memory_budget_bytes + stated_base, (
            f"peak {peak >> 20} MiB, baseline {baseline >> 20} MiB"
        )
        assert client.list_models()[0].name == "poc-0"
        assert len(client.list_models()) == 13


HOSTILE_LIMITS = Limits(
    max_models=16,
    memory_budget_bytes=512 * MiB,
    workers=2,
    worker_memory_bytes=2048 * MiB,
    inference_timeout_ms=2000,
)


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[tuple[ServerProcess, blindinfer.Client]]:
    with (
        start_server(_server_args(HOSTILE_LIMITS)) as server,
        _connect(server, HOSTILE_LIMITS) as client,
    ):
        yield server, client


def _server_error(call: object) -> blindinfer.ServerError:
    with pytest.raises(blindinfer.ServerError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_hostile_models_are_contained(
    hostile_server: tuple[ServerProcess, blindinfer.Client],
) -> None:
    _, client = hostile_server
    good = onnx_models.model_bytes(onnx_models.mlp_model())
    client.upload_model(good, name="good")
    feed = {"x": np.ones((1, 64), np.float32)}
    want = client.run_model("good", feed)["probabilities"]

    client.upload_model(hostile_models.slow_model(), name="slow")
    slow = _server_error(lambda: client.run_model("slow", {"x": np.ones((256, 256), np.float32)}))
    assert (slow.status, slow.code) == (504, "inference_timeout")
    assert np.array_equal(client.run_model("good", feed)["probabilities"], want)

    client.upload_model(hostile_models.huge_allocation_model(8 << 30), name="huge")
    huge = _server_error(lambda: client.run_model("huge", {"x": np.ones(1, np.float32)}))
    assert (huge.status, huge.code) == (422, "memory_limit")
    assert np.array_equal(client.run_model("good", feed)["probabilities"], want)

    for label, data in [
        ("corrupted", hostile_models.corrupted_model()),
        ("external", hostile_models.external_data_model()),
    ]:
        refused = _server_error(lambda d=data, n=label: client.upload_model(d, name=n))
        assert (refused.status, refused.code) == (400, "invalid_model")
    assert (
        "external data"
        in _server_error(
            lambda: client.upload_model(hostile_models.external_data_model(), name="x")
        ).message
    )
    assert {m.name for m in client.list_models()} == {"good", "slow", "huge"}


def test_other_tenants_keep_being_served_while_a_model_hangs(
    hostile_server: tuple[ServerProcess, blindinfer.Client],
) -> None:
    _, client = hostile_server
    client.upload_model(hostile_models.slow_model(), name="slow2")
    good = client.upload_model(onnx_models.mlp_model(seed=3), name="good2")
    feed = {"x": np.ones((1, 64), np.float32)}
    errors: list[blindinfer.ServerError] = []
    hang = threading.Thread(
        target=lambda: errors.append(
            _server_error(lambda: client.run_model("slow2", {"x": np.ones((256, 256), np.float32)}))
        )
    )
    hang.start()
    served = 0
    while hang.is_alive():
        client.run_model(good.model_id, feed)
        served += 1
    hang.join()
    assert errors[0].code == "inference_timeout"
    assert served >= 5  # the other worker went on serving while the hung one was killed


def test_crash_consistency_kill_during_uploads(tmp_path: Path) -> None:
    """kill -9 the server while uploads stream in (and, with a budget of two models, while
    it evicts); every acknowledged model survives, bit-identical, nothing half-written
    appears."""
    limits = Limits(workers=1, max_models=64, memory_budget_bytes=10 * MiB)
    store = tmp_path / "store"
    acknowledged: dict[str, bytes] = {}
    for round_ in range(3):
        with start_server(_server_args(limits, f"--store-dir={store}")) as server:
            client = _connect(server, limits)
            for index in range(4):
                model = hostile_models.large_initializer_model(4 * MiB, seed=round_ * 10 + index)
                info = client.upload_model(model, name=f"r{round_}-{index}")
                acknowledged[info.model_id] = model
            # a last upload is cut off by the kill
            cut = threading.Thread(
                target=lambda c=client: _swallow(
                    lambda: c.upload_model(
                        hostile_models.large_initializer_model(32 * MiB, seed=99), name="cut"
                    )
                )
            )
            cut.start()
            time.sleep(0.05 * (round_ + 1))
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait()
            cut.join()
            client.close()
    with (
        start_server(_server_args(limits, f"--store-dir={store}")) as server,
        _connect(server, limits) as client,
    ):
        listed = {m.model_id: m for m in client.list_models()}
        assert set(acknowledged) <= set(listed)
        extra = set(listed) - set(acknowledged)
        assert all(listed[m].name == "cut" for m in extra)  # only if it was acknowledged
        n = 4 * MiB // 4
        for model_id, model in acknowledged.items():
            weights = onnx.numpy_helper.to_array(onnx.load_from_string(model).graph.initializer[0])
            y = client.run_model(model_id, {"x": np.ones(n, np.float32)})["y"]
            assert np.array_equal(y, weights)


def _swallow(call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except Exception:
        return


def test_audit_log_of_a_persistent_server_verifies(tmp_path: Path) -> None:
    limits = Limits(workers=1)
    store = tmp_path / "store"
    with (
        start_server(_server_args(limits, f"--store-dir={store}")) as server,
        _connect(server, limits) as client,
    ):
        info = client.upload_model(onnx_models.model_bytes(onnx_models.mlp_model()), name="m")
        client.delete_model(info.model_id)
    log = store / "audit.log"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["server_start", "upload", "delete", "server_stop"]
    assert all("name" not in json.dumps(e.get("detail", {})) for e in entries)
    result = subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", "audit", "verify", str(log), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["entries"] == 4
