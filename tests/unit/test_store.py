"""The model store's contract, on ModelRegistry (sealed storage + worker processes):
resolution by id/name/hash, one session per distinct content, idempotent re-uploads,
conflicts, capacity, name rules, unknown references and refused uploads.

What is new with the registry (owners, memory budget, eviction, durability, audit) is in
test_registry.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blindinfer.runtime.errors import InvalidModelError
from blindinfer.runtime.workers import WorkerPool
from blindinfer.store.errors import (
    InvalidModelNameError,
    ModelConflictError,
    StoreFullError,
    UnknownModelError,
)
from blindinfer.store.names import check_name, is_model_id, is_sha256
from blindinfer.store.registry import ModelRegistry
from blindinfer.store.sealed import ModelRecord, SealedStore
from support.onnx_models import invalid_model_bytes, mlp_model, mlp_reference, model_bytes

GIB = 1 << 30
OWNER = "tenant-a"
DIMS = (8, 16, 3)  # in_features, hidden, out_features: small, so uploads are quick


def _mlp(seed: int) -> bytes:
    return model_bytes(mlp_model(*DIMS, seed=seed))


DOUBLE, TRIPLE, HALF = _mlp(1), _mlp(2), _mlp(3)  # three distinct models
SEED = {DOUBLE: 1, TRIPLE: 2, HALF: 3}
DOUBLE_SHA = hashlib.sha256(DOUBLE).hexdigest()
TRIPLE_SHA = hashlib.sha256(TRIPLE).hexdigest()
HALF_SHA = hashlib.sha256(HALF).hexdigest()
X = np.random.default_rng(0).standard_normal((3, DIMS[0])).astype(np.float32)


class CountingPool:
    """The real pool, counting the sessions it is asked to build."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        self.built: list[str] = []

    def validate_and_load(self, key: str, data: bytes) -> Any:
        self.built.append(key)
        return self._pool.validate_and_load(key, data)

    def load(self, key: str, data: bytes) -> Any:
        self.built.append(key)
        return self._pool.load(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


@dataclasses.dataclass
class Store:
    registry: ModelRegistry
    sealed: SealedStore
    pool: CountingPool

    def add(self, data: bytes, sha256: str, name: str | None = None) -> tuple[ModelRecord, bool]:
        return self.registry.add(data, sha256, name=name, owner=OWNER)

    def resolve(self, ref: str) -> ModelRecord:
        return self.registry.resolve(ref, OWNER)

    def models(self) -> list[ModelRecord]:
        return self.registry.records()

    @property
    def distinct_sessions(self) -> int:
        return self.registry.stats().loaded

    def run(self, ref: str) -> np.ndarray:
        return self.registry.run(self.resolve(ref), {"x": X})["probabilities"]


def _expected(data: bytes) -> np.ndarray:
    return mlp_reference(X, *DIMS, seed=SEED[data])


def _check_runs(store: Store, ref: str, data: bytes) -> None:
    np.testing.assert_allclose(store.run(ref), _expected(data), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def pool_and_box() -> Iterator[tuple[WorkerPool, list[ModelRegistry]]]:
    box: list[ModelRegistry] = []
    pool = WorkerPool(
        workers=1,
        memory_limit_bytes=2 * GIB,
        timeout_s=10,
        intra_op_threads=1,
        source=lambda sha256: box[-1].source(sha256),
    )
    yield pool, box
    pool.close()


@pytest.fixture
def store(pool_and_box: tuple[WorkerPool, list[ModelRegistry]], tmp_path: Path) -> Iterator[Store]:
    pool, box = pool_and_box
    counting = CountingPool(pool)
    sealed = SealedStore(tmp_path / "store", secrets.token_bytes(32), max_bytes=GIB)
    registry = ModelRegistry(
        sealed=sealed,
        pool=counting,  # type: ignore[arg-type]
        memory_budget=GIB,
        max_models=3,
    )
    box.append(registry)
    yield Store(registry, sealed, counting)
    box.clear()
    for worker in pool.stats():
        for key in worker.models:
            pool.unload(key)


def test_add_and_resolve_by_id_name_and_sha256(store: Store) -> None:
    model, created = store.add(DOUBLE, DOUBLE_SHA, "double")
    assert created is True
    assert is_model_id(model.model_id)
    assert (model.name, model.sha256, model.size, model.owner) == (
        "double",
        DOUBLE_SHA,
        len(DOUBLE),
        OWNER,
    )
    assert model.shared_with == ()
    assert store.resolve(model.model_id) == model
    assert store.resolve("double") == model
    assert store.resolve(DOUBLE_SHA) == model
    _check_runs(store, "double", DOUBLE)
    assert store.models() == [model]
    assert store.distinct_sessions == 1
    assert store.sealed.records() == [model]  # sealed before it was acknowledged
    assert store.sealed.get(model.model_id) == DOUBLE


def test_anonymous_model_is_named_after_its_id(store: Store) -> None:
    model, created = store.add(DOUBLE, DOUBLE_SHA)
    assert created
    assert model.name == model.model_id
    assert store.resolve(model.model_id) == model
    # Anonymous uploads are never deduplicated into one entry (they have no name to match).
    second, created_again = store.add(DOUBLE, DOUBLE_SHA)
    assert created_again
    assert second.model_id != model.model_id
    assert second.sha256 == model.sha256
    assert store.distinct_sessions == 1
    assert store.sealed.used_bytes == len(DOUBLE)


def test_same_bytes_under_two_names_share_one_session(store: Store) -> None:
    a, _ = store.add(DOUBLE, DOUBLE_SHA, "a")
    b, created = store.add(DOUBLE, DOUBLE_SHA, "b")
    assert created
    assert a.model_id != b.model_id
    assert store.distinct_sessions == 1
    assert len(store.models()) == 2
    # Deleting one keeps the other runnable on the shared session.
    store.registry.delete(store.resolve("a"))
    with pytest.raises(UnknownModelError):
        store.resolve("a")
    assert store.distinct_sessions == 1
    _check_runs(store, "b", DOUBLE)
    assert store.resolve(DOUBLE_SHA) == b
    store.registry.delete(store.resolve(b.model_id))
    assert store.distinct_sessions == 0
    assert store.models() == []


def test_shared_session_is_built_once(store: Store) -> None:
    store.add(DOUBLE, DOUBLE_SHA, "a")
    store.add(DOUBLE, DOUBLE_SHA, "b")
    store.add(TRIPLE, TRIPLE_SHA, "c")
    assert store.pool.built == [DOUBLE_SHA, TRIPLE_SHA]
    assert store.distinct_sessions == 2
    _check_runs(store, "a", DOUBLE)
    _check_runs(store, "b", DOUBLE)
    assert store.pool.built == [DOUBLE_SHA, TRIPLE_SHA]  # running loads nothing more


def test_same_name_same_bytes_is_idempotent(store: Store) -> None:
    first, created = store.add(DOUBLE, DOUBLE_SHA, "m")
    again, created_again = store.add(DOUBLE, DOUBLE_SHA, "m")
    assert (created, created_again) == (True, False)
    assert again == first
    assert again.model_id == first.model_id
    assert store.models() == [first]
    assert store.distinct_sessions == 1
    assert store.sealed.records() == [first]
    assert store.pool.built == [DOUBLE_SHA]


def test_idempotent_re_upload_succeeds_even_when_full(store: Store) -> None:
    store.add(DOUBLE, DOUBLE_SHA, "a")
    store.add(TRIPLE, TRIPLE_SHA, "b")
    c, _ = store.add(HALF, HALF_SHA, "c")
    again, created = store.add(HALF, HALF_SHA, "c")
    assert (again, created) == (c, False)


def test_same_name_other_bytes_is_a_conflict(store: Store) -> None:
    original, _ = store.add(DOUBLE, DOUBLE_SHA, "m")
    with pytest.raises(ModelConflictError, match="'m' is already used"):
        store.add(TRIPLE, TRIPLE_SHA, "m")
    assert store.resolve("m") == original
    assert store.models() == [original]
    assert store.distinct_sessions == 1
    assert store.sealed.records() == [original]
    assert store.pool.built == [DOUBLE_SHA]  # refused before anything was loaded
    _check_runs(store, "m", DOUBLE)


def test_max_models(store: Store) -> None:
    store.add(DOUBLE, DOUBLE_SHA, "a")
    store.add(TRIPLE, TRIPLE_SHA, "b")
    store.add(DOUBLE, DOUBLE_SHA, "c")  # shares a session but still counts as a model
    with pytest.raises(StoreFullError, match="maximum of 3 models"):
        store.add(HALF, HALF_SHA, "d")
    with pytest.raises(StoreFullError):
        store.add(DOUBLE, DOUBLE_SHA, "e")
    with pytest.raises(StoreFullError):
        store.add(HALF, HALF_SHA)
    assert [m.name for m in store.models()] == ["a", "b", "c"]
    assert len(store.sealed.records()) == 3
    assert store.distinct_sessions == 2
    assert HALF_SHA not in store.pool.built  # refused before anything was loaded
    store.registry.delete(store.resolve("b"))
    d, created = store.add(HALF, HALF_SHA, "d")
    assert created
    assert store.resolve("d") == d
    _check_runs(store, "d", HALF)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("ab" * 32, id="64-hex"),
        pytest.param("m-" + "0f" * 16, id="model-id"),
        pytest.param("../x", id="dot-dot"),
        pytest.param("", id="empty"),
        pytest.param("a" * 129, id="129-chars"),
        pytest.param(".hidden", id="leading-dot"),
        pytest.param("-x", id="leading-dash"),
        pytest.param("a/b", id="slash"),
        pytest.param("a b", id="space"),
        pytest.param("é", id="non-ascii"),
        pytest.param("x\n", id="newline"),
    ],
)
def test_invalid_names(store: Store, name: str) -> None:
    with pytest.raises(InvalidModelNameError):
        check_name(name)
    with pytest.raises(InvalidModelNameError):
        store.add(DOUBLE, DOUBLE_SHA, name)
    assert store.models() == []
    assert store.distinct_sessions == 0
    assert store.sealed.records() == []
    assert store.pool.built == []


@pytest.mark.parametrize("name", ["a" * 128, "A", "9", "my_model-1.onnx", "m-" + "0f" * 15])
def test_valid_names(store: Store, name: str) -> None:
    assert check_name(name) == name
    model, _ = store.add(DOUBLE, DOUBLE_SHA, name)
    assert store.resolve(name) == model
    assert store.sealed.record(model.model_id).name == name


def test_name_syntax_spaces_are_disjoint() -> None:
    assert is_sha256(DOUBLE_SHA)
    assert not is_sha256(DOUBLE_SHA.upper())
    assert not is_sha256(DOUBLE_SHA[:-1])
    assert is_model_id("m-" + "a" * 32)
    assert not is_model_id("m-" + "A" * 32)
    assert not is_model_id("m-" + "a" * 31)


def test_unknown_refs(store: Store) -> None:
    store.add(DOUBLE, DOUBLE_SHA, "a")
    for ref in ("b", "m-" + "0" * 32, TRIPLE_SHA, "", "A"):
        with pytest.raises(UnknownModelError):
            store.resolve(ref)
    with pytest.raises(UnknownModelError):
        store.registry.source(TRIPLE_SHA)
    assert [m.name for m in store.models()] == ["a"]


def test_delete_unknown_on_empty_store(store: Store) -> None:
    ghost = ModelRecord(
        model_id="m-" + "0" * 32,
        name="nothing",
        sha256=DOUBLE_SHA,
        owner=OWNER,
        size=len(DOUBLE),
        created_at=0.0,
    )
    with pytest.raises(UnknownModelError, match=r"no model is known as 'm-0{32}'"):
        store.registry.delete(ghost)
    with pytest.raises(UnknownModelError, match="no model is visible to this API key as 'nothing'"):
        store.resolve("nothing")


def test_delete_twice(store: Store) -> None:
    a, _ = store.add(DOUBLE, DOUBLE_SHA, "a")
    store.registry.delete(a)
    with pytest.raises(UnknownModelError):
        store.registry.delete(a)
    assert store.models() == []


def test_delete_by_sha256(store: Store) -> None:
    a, _ = store.add(DOUBLE, DOUBLE_SHA, "a")
    store.registry.delete(store.resolve(DOUBLE_SHA))
    assert store.distinct_sessions == 0
    assert store.sealed.records() == []
    assert store.sealed.used_bytes == 0
    with pytest.raises(UnknownModelError):
        store.resolve("a")
    with pytest.raises(UnknownModelError):
        store.resolve(a.model_id)


@pytest.mark.parametrize("kind", sorted(invalid_model_bytes()))
def test_invalid_model_is_not_stored(store: Store, kind: str) -> None:
    bogus = invalid_model_bytes()[kind]
    with pytest.raises(InvalidModelError):
        store.add(bogus, hashlib.sha256(bogus).hexdigest(), "bogus")
    assert store.models() == []
    assert store.distinct_sessions == 0
    assert store.sealed.records() == []
    assert store.sealed.used_bytes == 0
    assert all(w.models == () for w in store.pool.stats())
    with pytest.raises(UnknownModelError):
        store.resolve("bogus")
    # the name is still free
    model, created = store.add(DOUBLE, DOUBLE_SHA, "bogus")
    assert created
    assert store.resolve("bogus") == model
