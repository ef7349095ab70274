"""The test/benchmark models themselves are valid and behave as documented.

Why: every server test trusts these fixtures; if a fixture silently produced the wrong dtype or a
model onnxruntime rejects, server tests would pass or fail for the wrong reason.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from blindinfer.cli.demo_model import demo_input, demo_model
from support import onnx_models as om
from support import thirdparty as tp

CPU = ["CPUExecutionProvider"]
ORT_LOAD_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidProtobuf,
    ort_errors.InvalidGraph,
)


def _session(model: onnx.ModelProto | bytes | Path) -> ort.InferenceSession:
    if isinstance(model, onnx.ModelProto):
        model = om.model_bytes(model)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=CPU)


def _run(
    session: ort.InferenceSession, feed: dict[str, npt.NDArray[Any]]
) -> dict[str, npt.NDArray[Any]]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed), strict=True))


def _check(model: onnx.ModelProto | bytes) -> None:
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    onnx.checker.check_model(proto, full_check=True)


# --------------------------------------------------------------------------------------------
# dtype identity


def test_dtype_identity_model_checks_and_declares_every_dtype() -> None:
    model = om.dtype_identity_model()
    _check(model)
    session = _session(model)
    assert [i.name for i in session.get_inputs()] == [f"in_{dt}" for dt in om.DTYPES]
    assert [o.name for o in session.get_outputs()] == [f"out_{dt}" for dt in om.DTYPES] + [
        f"touched_{dt}" for dt in om.DTYPES
    ]
    for inp in session.get_inputs():
        dt = inp.name.removeprefix("in_")
        assert inp.shape == [f"{dt}_rows", f"{dt}_cols"]


@pytest.mark.parametrize(("rows", "cols"), [(3, 5), (1, 1), (0, 4), (7, 0)])
def test_dtype_identity_model_round_trips_every_dtype_exactly(rows: int, cols: int) -> None:
    session = _session(om.dtype_identity_model())
    feed = om.dtype_identity_feed(rows, cols)
    outputs = _run(session, feed)
    for dt in om.DTYPES:
        given_in = feed[f"in_{dt}"]
        out = outputs[f"out_{dt}"]
        assert out.dtype == np.dtype(dt) == given_in.dtype
        assert out.shape == (rows, cols)
        assert np.array_equal(out, given_in, equal_nan=given_in.dtype.kind == "f")
        assert out.tobytes() == given_in.tobytes()  # bit-exact: NaN payloads, -0.0
        touched = outputs[f"touched_{dt}"]
        expected = om.touched_reference(dt, given_in)
        assert touched.dtype == expected.dtype == np.dtype(dt)
        assert touched.tobytes() == expected.tobytes()
        if given_in.size >= 2:  # a lone INT_MIN is its own negation; min+max never are
            assert touched.tobytes() != given_in.tobytes()  # the op really touched the data


_SESSION_CACHE: dict[str, ort.InferenceSession] = {}


@settings(max_examples=60, deadline=None)
@given(
    dt=st.sampled_from(om.DTYPES),
    data=st.data(),
)
def test_dtype_identity_model_property(dt: str, data: st.DataObject) -> None:
    if "s" not in _SESSION_CACHE:
        _SESSION_CACHE["s"] = _session(om.dtype_identity_model())
    session = _SESSION_CACHE["s"]
    arr = data.draw(hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=2, max_dims=2, max_side=6)))
    feed = om.dtype_identity_feed(1, 1)
    feed[f"in_{dt}"] = arr
    outputs = _run(session, feed)
    assert outputs[f"out_{dt}"].dtype == arr.dtype
    assert outputs[f"out_{dt}"].tobytes() == arr.tobytes()
    assert outputs[f"touched_{dt}"].tobytes() == om.touched_reference(dt, arr).tobytes()


# --------------------------------------------------------------------------------------------
# multi io, mlp, doc string, helpers


@pytest.mark.parametrize("batch", [1, 4, 17])
def test_multi_io_model(batch: int) -> None:
    model = om.multi_io_model()
    _check(model)
    session = _session(model)
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        ("features", ["batch", 4], "tensor(float)"),
        ("ids", ["batch"], "tensor(int64)"),
        ("mask", ["batch"], "tensor(bool)"),
    ]
    feed = om.multi_io_feed(batch)
    outputs = _run(session, feed)
    expected = om.multi_io_reference(feed)
    assert list(outputs) == ["logits", "ids_float", "masked_ids", "mask_count"]
    assert outputs["logits"].shape == (batch, 3)
    assert outputs["logits"].dtype == np.float32
    np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-5, atol=1e-6)
    for name in ("ids_float", "masked_ids", "mask_count"):
        assert outputs[name].dtype == expected[name].dtype
        assert outputs[name].shape == expected[name].shape
        assert np.array_equal(outputs[name], expected[name])
    assert outputs["mask_count"].shape == ()


@pytest.mark.parametrize(
    ("in_features", "hidden", "out_features", "batch"), [(64, 256, 10, 8), (3, 5, 2, 1)]
)
def test_mlp_model(in_features: int, hidden: int, out_features: int, batch: int) -> None:
    model = om.mlp_model(in_features, hidden, out_features)
    _check(model)
    session = _session(model)
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("x", ["batch", in_features])]
    x = np.random.default_rng(5).standard_normal((batch, in_features)).astype(np.float32)
    (probs,) = session.run(["probabilities"], {"x": x})
    assert probs.shape == (batch, out_features)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        probs, om.mlp_reference(x, in_features, hidden, out_features), rtol=1e-4, atol=1e-6
    )


def test_models_are_deterministic_and_seed_sensitive() -> None:
    assert om.model_bytes(om.mlp_model()) == om.model_bytes(om.mlp_model())
    assert om.model_bytes(om.mlp_model(seed=1)) != om.model_bytes(om.mlp_model())
    assert om.model_bytes(om.dtype_identity_model()) == om.model_bytes(om.dtype_identity_model())
    assert om.model_bytes(om.multi_io_model()) == om.model_bytes(om.multi_io_model())


def test_with_doc_string_changes_bytes_not_behaviour() -> None:
    base = om.mlp_model(8, 16, 3)
    other = om.with_doc_string(base, "another description")
    assert other.doc_string == "another description"
    assert base.doc_string != other.doc_string  # the original is not mutated
    assert om.model_bytes(base) != om.model_bytes(other)
    assert other.graph == base.graph
    _check(other)
    x = np.ones((2, 8), dtype=np.float32)
    assert np.array_equal(
        _session(base).run(None, {"x": x})[0], _session(other).run(None, {"x": x})[0]
    )


@pytest.mark.parametrize("kind", sorted(om.invalid_model_bytes()))
def test_invalid_model_bytes_are_rejected(kind: str) -> None:
    blob = om.invalid_model_bytes()[kind]
    with pytest.raises(ORT_LOAD_ERRORS):
        ort.InferenceSession(blob, providers=CPU)
    with pytest.raises((onnx.checker.ValidationError, DecodeError)):
        _check(blob)


# --------------------------------------------------------------------------------------------
# demo model


def test_demo_model() -> None:
    blob = demo_model()
    assert blob == demo_model()
    _check(blob)
    session = _session(blob)
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        ("features", ["batch", 16], "tensor(float)")
    ]
    feed = demo_input()
    assert set(feed) == {"features"}
    assert feed["features"].dtype == np.float32
    outputs = _run(session, feed)
    assert list(outputs) == ["scores", "label"]
    batch = feed["features"].shape[0]
    assert outputs["scores"].shape == (batch, 4)
    assert outputs["scores"].dtype == np.float32
    assert outputs["label"].shape == (batch,)
    assert outputs["label"].dtype == np.int64
    np.testing.assert_allclose(outputs["scores"].sum(axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(outputs["label"], outputs["scores"].argmax(axis=1))


# --------------------------------------------------------------------------------------------
# third-party models


def _magika() -> tuple[Path, dict[str, npt.NDArray[Any]]]:
    try:
        return tp.magika_model()
    except tp.ThirdPartyModelUnavailable as exc:
        pytest.skip(str(exc))


def _silero(with_context: bool = False) -> tuple[Path, dict[str, npt.NDArray[Any]]]:
    try:
        return tp.silero_model(with_context=with_context)
    except tp.ThirdPartyModelUnavailable as exc:
        pytest.skip(str(exc))


def test_magika_model_runs_and_agrees_with_magika() -> None:
    path, feed = _magika()
    _check(onnx.load(str(path)))
    session = _session(path)
    assert [(i.name, i.type) for i in session.get_inputs()] == [("bytes", "tensor(int32)")]
    assert feed["bytes"].shape == (1, 2048)
    assert feed["bytes"].dtype == np.int32
    outputs = _run(session, feed)
    labels = tp.magika_labels()
    assert list(outputs) == ["target_label"]
    assert outputs["target_label"].shape == (1, len(labels)) == (1, 214)
    assert outputs["target_label"].dtype == np.float32
    predicted = labels[int(outputs["target_label"][0].argmax())]
    assert predicted == tp.magika_reference_label(tp.DEFAULT_MAGIKA_CONTENT) == "python"


def test_magika_batch_feed() -> None:
    _magika()
    contents = [tp.DEFAULT_MAGIKA_CONTENT, b'{"k": [1, 2, 3]}\n' * 20, b"\x00\x01binary" * 50]
    path, feed = tp.magika_model(contents)
    assert feed["bytes"].shape == (3, 2048)
    (scores,) = _session(path).run(["target_label"], feed)
    assert scores.shape == (3, 214)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-4)


@pytest.mark.parametrize("with_context", [False, True])
def test_silero_model_runs(with_context: bool) -> None:
    path, feed = _silero(with_context)
    _check(onnx.load(str(path)))
    session = _session(path)
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("input", "tensor(float)"),
        ("state", "tensor(float)"),
        ("sr", "tensor(int64)"),
    ]
    assert feed["input"].shape == ((1, 576) if with_context else (1, 512))
    assert feed["state"].shape == (2, 1, 128)
    assert feed["sr"].shape == ()
    outputs = _run(session, feed)
    assert list(outputs) == ["output", "stateN"]
    assert outputs["output"].shape == (1, 1)
    assert outputs["output"].dtype == np.float32
    assert 0.0 <= float(outputs["output"][0, 0]) <= 1.0
    assert outputs["stateN"].shape == (2, 1, 128)
    assert outputs["stateN"].dtype == np.float32
    # the state output feeds the next call
    feed["state"] = outputs["stateN"]
    assert session.run(None, feed)[0].shape == (1, 1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # silero's importlib.resources.path
def test_silero_context_feed_matches_silero_wrapper() -> None:
    path, feed = _silero(with_context=True)
    silero_vad = pytest.importorskip("silero_vad")
    torch = pytest.importorskip("torch")
    wrapper = silero_vad.load_silero_vad(onnx=True)
    expected = wrapper(torch.from_numpy(tp.silero_audio_chunk()), tp.SILERO_SAMPLE_RATE).numpy()
    got = _session(path).run(["output"], feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# MiniLM (slow: exports once, then cached)

TEXTS = [
    "Confidential inference keeps the model owner's weights and the user's data private.",
    "The quick brown fox jumps over the lazy dog.",
    "x",
    "",
]


@pytest.mark.slow
def test_minilm_onnx_matches_sentence_transformers() -> None:
    minilm = pytest.importorskip("support.minilm")
    path = minilm.minilm_onnx_path()
    assert path.is_file()
    assert minilm.minilm_onnx_path() == path  # cached
    _check(onnx.load(str(path)))
    session = _session(path)
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        (name, ["batch", "sequence"], "tensor(int64)") for name in minilm.INPUT_NAMES
    ]
    reference = minilm.torch_embedding(TEXTS)
    for seq_len in (128, 32):
        feed = minilm.minilm_inputs(TEXTS, seq_len=seq_len)
        for name in minilm.INPUT_NAMES:
            assert feed[name].shape == (len(TEXTS), seq_len)
            assert feed[name].dtype == np.int64
        outputs = _run(session, feed)
        assert list(outputs) == ["sentence_embedding", "last_hidden_state"]
        emb = outputs["sentence_embedding"]
        assert emb.shape == (len(TEXTS), 384)
        assert emb.dtype == np.float32
        assert outputs["last_hidden_state"].shape == (len(TEXTS), seq_len, 384)
        assert outputs["last_hidden_state"].dtype == np.float32
        np.testing.assert_allclose(emb, reference, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # batch 1 works too (dynamic batch axis)
    single = _run(session, minilm.minilm_inputs(TEXTS[:1]))["sentence_embedding"]
    np.testing.assert_allclose(single, reference[:1], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_minilm_latency_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion on speed: records the in-process baseline the benchmarks compare to."""
    minilm = pytest.importorskip("support.minilm")
    path = minilm.minilm_onnx_path()
    session = _session(path)
    feed = minilm.minilm_inputs(TEXTS[:1], seq_len=128)
    for _ in range(5):
        session.run(None, feed)
    samples = []
    for _ in range(50):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - start)
    median_ms = statistics.median(samples) * 1000
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    with capsys.disabled():
        print(
            f"\nMiniLM onnxruntime batch1 seq128 median {median_ms:.2f} ms "
            f"(size {path.stat().st_size} B, sha256 {digest})"
        )
    assert median_ms > 0
