"""The registry between tenants (issue 21, items 7 and 8), on a real worker pool:
references resolve only among visible records with one answer for hidden and missing;
known bytes are validated again for another tenant; quotas and the store limit hold under
parallel uploads; loaded memory is charged per tenant and a tenant evicts only its own."""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from blindinfer.runtime.workers import WorkerPool
from blindinfer.server.auth import TenantConfig
from blindinfer.server.quotas import QuotaExceededError, check_upload_against
from blindinfer.store.errors import StoreFullError, TenantMemoryQuotaError, UnknownModelError
from blindinfer.store.registry import ModelRegistry, unknown_model_message
from blindinfer.store.sealed import ModelRecord, SealedStore
from support.onnx_models import IR_VERSION, OPSET, mlp_model, model_bytes

GIB = 1 << 30
MIB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def mlp(seed: int) -> bytes:
    return model_bytes(mlp_model(in_features=8, hidden=16, out_features=3, seed=seed))


@functools.cache
def big(value: float, mib: int = 16) -> bytes:
    """A model whose session really holds `mib` MiB (Gather keeps C from being folded)."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["C", "idx"], ["picked"]),
            helper.make_node("Add", ["picked", "x"], ["y"]),
        ],
        f"big_{value}",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["k"]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"])],
        [numpy_helper.from_array(np.full(mib * MIB // 4, value, np.float32), "C")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model_bytes(model)


BIG_FEED: dict[str, np.ndarray] = {"x": np.array([0.5], np.float32), "idx": np.array([1], np.int64)}
MLP_FEED: dict[str, np.ndarray] = {"x": np.ones((1, 8), np.float32)}


@pytest.fixture(scope="module")
def pool_and_box() -> Iterator[tuple[WorkerPool, list[ModelRegistry]]]:
    box: list[ModelRegistry] = []
    pool = WorkerPool(
        workers=2,
        memory_limit_bytes=2 * GIB,
        timeout_s=20,
        intra_op_threads=1,
        source=lambda sha256: box[-1].source(sha256),
    )
    yield pool, box
    pool.close()


Make = Callable[..., ModelRegistry]


@pytest.fixture
def make(pool_and_box: tuple[WorkerPool, list[ModelRegistry]], tmp_path: Path) -> Iterator[Make]:
    pool, box = pool_and_box

    def build(
        *,
        budget: int = GIB,
        max_models: int = 50,
        tenant_memory: Callable[[str], int | None] | None = None,
    ) -> ModelRegistry:
        sealed = SealedStore(tmp_path / f"store-{len(box)}", secrets.token_bytes(32), max_bytes=GIB)
        registry = ModelRegistry(
            sealed=sealed,
            pool=pool,
            memory_budget=budget,
            max_models=max_models,
            tenant_memory=tenant_memory,
        )
        box.append(registry)
        return registry

    yield build
    box.clear()
    for worker in pool.stats():
        for model_key in worker.models:
            pool.unload(model_key)


def _seen_by(tenant: str) -> Callable[[ModelRecord], bool]:
    return lambda r: r.owner == tenant or tenant in r.shared_with or "*" in r.shared_with


def test_a_hidden_model_and_a_missing_one_get_the_same_answer(make: Make) -> None:
    reg = make()
    secret, _ = reg.add(mlp(1), sha(mlp(1)), name="secret", owner="alice")
    pairs = [
        (secret.model_id, "m-" + "0" * 32),
        (secret.sha256, "0" * 64),
        ("secret", "absent"),
    ]
    for hidden, missing in pairs:
        answers = []
        for ref in (hidden, missing):
            with pytest.raises(UnknownModelError) as caught:
                reg.resolve(ref, "bob", _seen_by("bob"))
            answers.append(str(caught.value))
        assert answers == [unknown_model_message(hidden), unknown_model_message(missing)]
        assert "no model is visible to this API key as" in answers[0]
    assert reg.resolve(secret.model_id, "alice", _seen_by("alice")) == secret


def test_a_hash_finds_the_visible_copy_not_the_oldest(make: Make) -> None:
    reg = make()
    hidden, _ = reg.add(mlp(2), sha(mlp(2)), name="a", owner="alice")
    visible, created = reg.add(mlp(2), sha(mlp(2)), name="b", owner="bob", shared_with=["carol"])
    assert created and visible.model_id != hidden.model_id
    assert reg.resolve(sha(mlp(2)), "carol", _seen_by("carol")) == visible
    assert reg.resolve(sha(mlp(2)), "alice", _seen_by("alice")) == hidden
    with pytest.raises(UnknownModelError):
        reg.resolve(sha(mlp(2)), "dave", _seen_by("dave"))


def test_bytes_only_another_tenant_holds_are_validated_again(make: Make) -> None:
    """The uploader's own quota applies to the measured session of bytes someone else has
    loaded, as to new bytes; the other tenant's live session is left alone."""
    reg = make(tenant_memory=lambda t: 1 if t == "tiny" else None)
    theirs, _ = reg.add(big(1.0), sha(big(1.0)), name="b", owner="bob")
    assert reg.loaded_by_tenant() == {"bob": pytest.approx(16 * MIB, rel=0.25)}
    before = reg.loaded_by_tenant()
    for data in (big(1.0), big(2.0)):  # bytes bob has loaded, and bytes nobody has
        with pytest.raises(TenantMemoryQuotaError, match="memory quota"):
            reg.add(data, sha(data), name="copy", owner="tiny")
    assert reg.usage("tiny") == (0, 0)
    assert reg.loaded_by_tenant() == before
    assert reg.run(theirs, BIG_FEED)["y"][0] == pytest.approx(1.5)
    # another tenant within its quota gets its own record of the same bytes
    copy, created = reg.add(big(1.0), sha(big(1.0)), name="copy", owner="carol")
    assert created and copy.owner == "carol" and copy.model_id != theirs.model_id
    # and re-sending one's own model under the same name is still the same record
    assert reg.add(big(1.0), sha(big(1.0)), name="b", owner="bob") == (theirs, False)


def _parallel(action: Callable[[int], object], count: int) -> list[object]:
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def one(index: int) -> None:
        barrier.wait()
        try:
            results[index] = action(index)
        except Exception as exc:  # collected and checked by the caller
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_parallel_uploads_reserve_the_quota_atomically(make: Make) -> None:
    reg = make()
    limits = TenantConfig("t", max_models=3)

    def admit(models: int, stored: int, new: int) -> None:
        # a slow decision: any gap between deciding and reserving lets all twelve through
        time.sleep(0.02)
        check_upload_against(limits, models, stored, new)

    results = _parallel(
        lambda i: reg.add(mlp(100 + i), sha(mlp(100 + i)), name=None, owner="t", admit=admit),
        12,
    )
    stored = [r for r in results if isinstance(r, tuple)]
    refused = [r for r in results if isinstance(r, QuotaExceededError)]
    assert (len(stored), len(refused)) == (3, 9), results
    assert reg.usage("t") == (3, sum(r.size for r in reg.records()))  # nothing left reserved
    assert len(reg.records()) == 3
    with pytest.raises(QuotaExceededError):  # the early check agrees
        reg.check_room(None, "t", 1, admit)


def test_parallel_uploads_cannot_overfill_the_store(make: Make) -> None:
    reg = make(max_models=3)
    results = _parallel(
        lambda i: reg.add(mlp(200 + i), sha(mlp(200 + i)), name=None, owner=f"t{i % 4}"), 12
    )
    assert sum(isinstance(r, tuple) for r in results) == 3, results
    assert sum(isinstance(r, StoreFullError) for r in results) == 9, results
    assert len(reg.records()) == 3
    with pytest.raises(StoreFullError):
        reg.check_room(None, "t9")


def test_a_tenant_evicts_its_own_models_never_the_others(make: Make) -> None:
    quota = 24 * MIB  # one 16 MiB session per tenant
    reg = make(budget=50 * MIB, tenant_memory=lambda t: quota)
    victim, _ = reg.add(big(3.0), sha(big(3.0)), name="v", owner="bob")
    bob_before = reg.loaded_by_tenant()["bob"]
    models = [reg.add(big(v), sha(big(v)), name=f"m{v}", owner="mal")[0] for v in (4.0, 5.0, 6.0)]
    charged = reg.loaded_by_tenant()
    assert charged["bob"] == bob_before  # without the tenant quota, the third took it
    assert charged["mal"] <= quota
    assert reg.stats().memory_used <= 50 * MIB
    # mal's evicted models come back by evicting mal's own
    assert reg.run(models[0], BIG_FEED)["y"][0] == pytest.approx(4.5)
    assert reg.loaded_by_tenant()["bob"] == bob_before
    assert reg.run(victim, BIG_FEED)["y"][0] == pytest.approx(3.5)
    # one model over the whole quota is refused and leaves nothing behind
    with pytest.raises(TenantMemoryQuotaError):
        reg.add(big(7.0, 32), sha(big(7.0, 32)), name="huge", owner="mal")
    assert [r.name for r in reg.records() if r.owner == "mal"] == ["m4.0", "m5.0", "m6.0"]
    assert reg.loaded_by_tenant()["bob"] == bob_before
