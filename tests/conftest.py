"""Shared fixtures: the project root and the shared attestation vectors."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(Hugging Face folder, onnxruntime-genai folder) of the tiny random Llama, built once
    per test session (about 10 s: torch + the og builder); see tests/support/tiny_llm.py."""
    pytest.importorskip("onnxruntime_genai")
    from support.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))
