"""`blindinfer demo` as ./scripts/demo.sh runs it: the flow, then the closing summary."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_ends_with_the_summary() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # the summary comes last, after the server stopped
    tail = out[out.index("7. server stopped") :]
    assert "pinned root: Blindinfer SIMULATION SGX Root CA" in tail
    assert "binds the TLS certificate's key" in tail
    assert "fresh nonce" in tail
    assert "measurement equals the policy" in tail
    assert "bit-exact with onnxruntime in-process: yes" in tail
    assert "model was deleted from the server: yes" in tail
    assert "NOT proven, because this is a simulation" in tail
    assert "operator can read its memory" in tail
    assert "not Intel's" in tail
    assert "measured build" in tail
    assert len(tail.strip().splitlines()) <= 16
