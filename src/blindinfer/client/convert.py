"""`blindinfer convert`: a GGUF file or a Hugging Face model folder -> an onnxruntime-genai
model folder (genai_config.json, model.onnx + external data, tokenizer files), offline.

The heavy lifting is onnxruntime-genai's own model builder, run as a child process with the
Hugging Face hub switched off. What this module adds is what the builder does not do itself,
each found by trying it (docs/generative.md, "Converting a model"):

- every mistake is caught before anything heavy starts (missing file, not a GGUF, a folder
  without config/weights/tokenizer, an output folder that is not empty, the `convert` extra
  not installed) and reported as a UsageError in one or two lines;
- a GGUF is first re-saved as a plain fp32 Hugging Face folder (`gguf_to_hf`), since the
  builder reads only those;
- transformers 5 writes RoPE settings nested per layer type, which some builder paths cannot
  read: the copy given to the builder has them flattened (the user's folder is never edited);
- the output always has tokenizer.json and a tokenizer_config.json carrying the chat template
  (onnxruntime-genai refuses a folder without tokenizer_config.json);
- the output appears atomically: the builder writes into a hidden sibling folder that is
  renamed to `--out` only once complete, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blindinfer.errors import BlindInferError, UsageError

PRECISIONS = ("int4", "fp32")
GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "install the extra: pip install 'blindinfer[convert]'"
# what the builder and the GGUF loader import (module names, not distribution names)
BUILDER_MODULES = ("onnxruntime_genai", "onnx_ir", "transformers", "torch")
GGUF_MODULES = ("gguf", "accelerate")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


class ConversionError(BlindInferError):
    """The builder (or the GGUF loader) failed on an input that passed every check; the
    message carries the last line of its log."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(
            f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}"
        )
    return precision


def source_kind(source: Path) -> str:
    """'gguf' or 'hf' for a usable source, else a UsageError saying what to give."""
    if not source.exists():
        raise UsageError(
            f"{source}: no such file or directory\n"
            "give a GGUF file or a Hugging Face model folder (config.json, weights, tokenizer)"
        )
    if source.is_dir():
        missing = []
        if not (source / "config.json").is_file():
            missing.append("config.json")
        if not any(any(source.glob(pattern)) for pattern in WEIGHT_PATTERNS):
            missing.append("weights (*.safetensors)")
        if not any((source / name).is_file() for name in TOKENIZER_FILES):
            missing.append("a tokenizer (tokenizer.json)")
        if missing:
            raise UsageError(
                f"{source} is not a Hugging Face model folder: no {', no '.join(missing)}\n"
                "give a folder saved with save_pretrained (model and tokenizer), or a GGUF file"
            )
        return "hf"
    try:
        with source.open("rb") as file:
            magic = file.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise UsageError(
            f"{source} is not a GGUF file (it does not start with 'GGUF')\n"
            "give a .gguf file or a Hugging Face model folder"
        )
    return "gguf"


def check_output(out: Path) -> None:
    """`out` must not exist, or be an empty folder: a conversion never overwrites."""
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise UsageError(f"--out {out} exists and is not a folder\ngive a new folder")
        if any(out.iterdir()):
            raise UsageError(
                f"--out {out} is not empty\ngive a new or empty folder (nothing is overwritten)"
            )
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: its parent folder {parent} does not exist")


def check_installed(kind: str) -> None:
    wanted = BUILDER_MODULES + (GGUF_MODULES if kind == "gguf" else ())
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"converting needs {', '.join(missing)}, not installed here\n{INSTALL_HINT}"
        )


def flatten_rope(config: dict[str, Any]) -> bool:
    """Adds the flat RoPE form to a config whose `rope_parameters` transformers 5 nested per
    layer type ({"full_attention": {...}, "sliding_attention": {...}}), on which the og 0.18
    builder fails (`KeyError: 'rope_type'`): the full-attention settings at the top of
    `rope_parameters`, the sliding theta as `rope_local_base_freq` in it (transformers 5 drops
    unknown top-level keys; the builder lifts `rope_parameters`' keys to the top), which is
    what the builder's model classes read. The nested entries stay for the builder paths
    that read them (Gemma 4). Returns whether anything changed."""
    changed = False
    for section in (config, config.get("text_config")):
        if not isinstance(section, dict):
            continue
        rope = section.get("rope_parameters")
        if not isinstance(rope, dict) or not rope or "rope_type" in rope:
            continue
        nested = {k: v for k, v in rope.items() if isinstance(v, dict)}
        full = nested.get("full_attention") or next(iter(nested.values()), None)
        if full is None:
            continue
        for key, value in full.items():
            rope.setdefault(key, value)
        sliding = nested.get("sliding_attention")
        if sliding is not None and "rope_theta" in sliding:
            rope.setdefault("rope_local_base_freq", sliding["rope_theta"])
        changed = True
    return changed


def builder_input(source: Path, work: Path) -> Path:
    """`source` itself, or a linked copy of it with config.json's RoPE settings flattened."""
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if not flatten_rope(config):
        return source
    linked = work / "hf-flat"
    linked.mkdir()
    for entry in source.iterdir():
        if entry.name != "config.json":
            (linked / entry.name).symlink_to(entry.absolute())
    (linked / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return linked


def complete_tokenizer(out: Path) -> None:
    """tokenizer.json must be there; tokenizer_config.json is written or completed with
    the chat template (transformers 5 saves it apart, in chat_template.jinja)."""
    if not (out / "tokenizer.json").is_file():
        raise ConversionError(
            "the builder wrote no tokenizer.json (onnxruntime-genai needs one); give a model "
            "whose tokenizer is a fast (tokenizers) one"
        )
    config_path = out / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
    template = out / "chat_template.jinja"
    if "chat_template" not in config and template.is_file():
        config["chat_template"] = template.read_text(encoding="utf-8")
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def _run_step(command: list[str], log: Path, what: str, *, verbose: bool) -> None:
    env = {**os.environ, **OFFLINE_ENV}
    with log.open("ab") as sink:
        completed = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=None if verbose else sink,
            stderr=None if verbose else subprocess.STDOUT,
            env=env,
            check=False,
        )
    if completed.returncode != 0:
        raise ConversionError(f"{what} failed (exit {completed.returncode}): {_last_line(log)}")


def _last_line(log: Path) -> str:
    """The last meaningful line of a child's log: the exception, past the progress bars."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "see the output above"
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output (run with --verbose to see it)"


def convert(
    source: Path,
    out: Path,
    *,
    precision: str = "int4",
    verbose: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Converts `source` (a GGUF file or a Hugging Face model folder) into the
    onnxruntime-genai model folder `out`, which must not exist or be empty. Returns `out`."""
    say = progress or (lambda _text: None)
    check_precision(precision)
    kind = source_kind(source)
    check_output(out)
    check_installed(kind)
    parent = out.absolute().parent
    with tempfile.TemporaryDirectory(prefix="blindinfer-convert-") as scratch:
        work = Path(scratch)
        log = work / "convert.log"
        if kind == "gguf":
            say(f"dequantizing {source.name} to a plain model (transformers)")
            hf_dir = work / "hf"
            command = [
                sys.executable,
                "-m",
                "blindinfer.client.gguf_to_hf",
                str(source),
                str(hf_dir),
            ]
            _run_step(command, log, "reading the GGUF", verbose=verbose)
        else:
            hf_dir = source
        hf_dir = builder_input(hf_dir, work)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        try:
            say(f"building the {precision} ONNX model (onnxruntime-genai model builder)")
            builder = [
                sys.executable, "-m", "onnxruntime_genai.models.builder",
                "-i", str(hf_dir), "-o", str(staging), "-p", precision, "-e", "cpu",
                "-c", str(work / "cache"),
                # never run Python shipped in a model folder (auto_map): its default, said
                "--extra_options", "hf_remote=false",
            ]  # fmt: skip
            _run_step(builder, log, "the model builder", verbose=verbose)
            complete_tokenizer(staging)
            if out.is_dir():
                out.rmdir()  # empty, checked above
            staging.rename(out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    say(f"done: {out}")
    return out
