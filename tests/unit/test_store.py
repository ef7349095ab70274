"""ModelStore with real ModelSessions: resolution by id/name/hash, deduplicated sessions,
idempotent re-uploads, conflicts, capacity and name rules."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from onnx import TensorProto, helper

from blindinfer.runtime.errors import InvalidModelError
from blindinfer.runtime.session import ModelSession
from blindinfer.store.errors import (
    InvalidModelNameError,
    ModelConflictError,
    StoreFullError,
    UnknownModelError,
)
from blindinfer.store.memory import ModelStore
from blindinfer.store.names import check_name, is_model_id, is_sha256


def _scale_model(factor: float, doc: str = "") -> bytes:
    """y = x * factor, x: FP32 [n]."""
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["f"], value_float=factor),
            helper.make_node("Mul", ["x", "f"], ["y"]),
        ],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=doc)
    model.ir_version = 8
    return bytes(model.SerializeToString())


DOUBLE = _scale_model(2.0)
TRIPLE = _scale_model(3.0)
HALF = _scale_model(0.5)
DOUBLE_SHA = hashlib.sha256(DOUBLE).hexdigest()
TRIPLE_SHA = hashlib.sha256(TRIPLE).hexdigest()
HALF_SHA = hashlib.sha256(HALF).hexdigest()
X = np.array([1.0, -2.5, 4.0], np.float32)


def _run(store: ModelStore, ref: str) -> np.ndarray:
    return store.resolve(ref).session.run({"x": X})["y"]


@pytest.fixture
def store() -> ModelStore:
    return ModelStore(max_models=3)


def test_add_and_resolve_by_id_name_and_sha256(store: ModelStore) -> None:
    model, created = store.add(DOUBLE, DOUBLE_SHA, "double")
    assert created is True
    assert is_model_id(model.model_id)
    assert (model.name, model.sha256, model.size) == ("double", DOUBLE_SHA, len(DOUBLE))
    assert store.resolve(model.model_id) is model
    assert store.resolve("double") is model
    assert store.resolve(DOUBLE_SHA) is model
    np.testing.assert_array_equal(_run(store, "double"), X * 2)
    assert store.models() == [model]
    assert store.distinct_sessions == 1


def test_anonymous_model_is_named_after_its_id(store: ModelStore) -> None:
    model, created = store.add(DOUBLE, DOUBLE_SHA)
    assert created
    assert model.name == model.model_id
    assert store.resolve(model.model_id) is model
    # Anonymous uploads are never deduplicated into one entry (they have no name to match).
    second, created_again = store.add(DOUBLE, DOUBLE_SHA)
    assert created_again
    assert second.model_id != model.model_id
    assert second.session is model.session
    assert store.distinct_sessions == 1


def test_same_bytes_under_two_names_share_one_session(store: ModelStore) -> None:
    a, _ = store.add(DOUBLE, DOUBLE_SHA, "a")
    b, created = store.add(DOUBLE, DOUBLE_SHA, "b")
    assert created
    assert a.model_id != b.model_id
    assert a.session is b.session
    assert store.distinct_sessions == 1
    assert len(store.models()) == 2
    # Deleting one keeps the other runnable on the shared session.
    assert store.delete("a") is a
    with pytest.raises(UnknownModelError):
        store.resolve("a")
    assert store.distinct_sessions == 1
    np.testing.assert_array_equal(_run(store, "b"), X * 2)
    assert store.resolve(DOUBLE_SHA) is b
    store.delete(b.model_id)
    assert store.distinct_sessions == 0
    assert store.models() == []


def test_shared_session_is_built_once() -> None:
    built: list[bytes] = []

    def factory(data: bytes) -> ModelSession:
        built.append(data)
        return ModelSession(data)

    store = ModelStore(max_models=3, session_factory=factory)
    store.add(DOUBLE, DOUBLE_SHA, "a")
    store.add(DOUBLE, DOUBLE_SHA, "b")
    store.add(TRIPLE, TRIPLE_SHA, "c")
    assert built == [DOUBLE, TRIPLE]
    assert store.distinct_sessions == 2


def test_same_name_same_bytes_is_idempotent(store: ModelStore) -> None:
    first, created = store.add(DOUBLE, DOUBLE_SHA, "m")
    again, created_again = store.add(DOUBLE, DOUBLE_SHA, "m")
    assert (created, created_again) == (True, False)
    assert again is first
    assert again.model_id == first.model_id
    assert store.models() == [first]
    assert store.distinct_sessions == 1


def test_idempotent_re_upload_succeeds_even_when_full(store: ModelStore) -> None:
    store.add(DOUBLE, DOUBLE_SHA, "a")
    store.add(TRIPLE, TRIPLE_SHA, "b")
    c, _ = store.add(HALF, HALF_SHA, "c")
    again, created = store.add(HALF, HALF_SHA, "c")
    assert (again, created) == (c, False)


def test_same_name_other_bytes_is_a_conflict(store: ModelStore) -> None:
    original, _ = store.add(DOUBLE, DOUBLE_SHA, "m")
    with pytest.raises(ModelConflictError, match="'m' is already used"):
        store.add(TRIPLE, TRIPLE_SHA, "m")
    assert store.resolve("m") is original
    assert store.models() == [original]
    assert store.distinct_sessions == 1
    np.testing.assert_array_equal(_run(store, "m"), X * 2)


def test_max_models(store: ModelStore) -> None:
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
    store.delete("b")
    d, created = store.add(HALF, HALF_SHA, "d")
    assert created
    assert store.resolve("d") is d
    np.testing.assert_array_equal(_run(store, "d"), X * 0.5)


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
def test_invalid_names(store: ModelStore, name: str) -> None:
    with pytest.raises(InvalidModelNameError):
        store.add(DOUBLE, DOUBLE_SHA, name)
    assert store.models() == []
    assert store.distinct_sessions == 0


@pytest.mark.parametrize("name", ["a" * 128, "A", "9", "my_model-1.onnx", "m-" + "0f" * 15])
def test_valid_names(store: ModelStore, name: str) -> None:
    assert check_name(name) == name
    model, _ = store.add(DOUBLE, DOUBLE_SHA, name)
    assert store.resolve(name) is model


def test_name_syntax_spaces_are_disjoint() -> None:
    assert is_sha256(DOUBLE_SHA)
    assert not is_sha256(DOUBLE_SHA.upper())
    assert not is_sha256(DOUBLE_SHA[:-1])
    assert is_model_id("m-" + "a" * 32)
    assert not is_model_id("m-" + "A" * 32)
    assert not is_model_id("m-" + "a" * 31)


def test_unknown_refs(store: ModelStore) -> None:
    store.add(DOUBLE, DOUBLE_SHA, "a")
    for ref in ("b", "m-" + "0" * 32, TRIPLE_SHA, "", "A"):
        with pytest.raises(UnknownModelError):
            store.resolve(ref)
        with pytest.raises(UnknownModelError):
            store.delete(ref)
    assert [m.name for m in store.models()] == ["a"]


def test_delete_unknown_on_empty_store(store: ModelStore) -> None:
    with pytest.raises(UnknownModelError, match="no model is known as 'nothing'"):
        store.delete("nothing")


def test_delete_by_sha256(store: ModelStore) -> None:
    a, _ = store.add(DOUBLE, DOUBLE_SHA, "a")
    assert store.delete(DOUBLE_SHA) is a
    assert store.distinct_sessions == 0
    with pytest.raises(UnknownModelError):
        store.resolve("a")


def test_invalid_model_is_not_stored(store: ModelStore) -> None:
    bogus = b"not onnx"
    with pytest.raises(InvalidModelError):
        store.add(bogus, hashlib.sha256(bogus).hexdigest(), "bogus")
    assert store.models() == []
    assert store.distinct_sessions == 0
    with pytest.raises(UnknownModelError):
        store.resolve("bogus")
