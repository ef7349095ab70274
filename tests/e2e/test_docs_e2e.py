"""The documentation matches the code: its snippets run, its field lists are complete.

docs/blindai-compat.md: its first bash block starts the server and its first python block
is a complete program for the unmodified BlindAI 0.6.3 client. The test starts the server
with that command and runs that program, changing only the port numbers (to free ones, so
that it never collides with anything else on the machine), then compares the printed
outputs with onnxruntime in-process, bit for bit.

docs/protocol.md: its table of the evidence document names exactly the fields the server
writes.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from blindinfer.cli.demo_model import demo_input, demo_model
from blindinfer.protocol.evidence import EvidenceDocument, evidence_document_json
from blindinfer.server.process import start_server

ROOT = Path(__file__).resolve().parents[2]
COMPAT_DOC = ROOT / "docs" / "blindai-compat.md"
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"
CONNECT = 'core.connect("127.0.0.1",'

pytestmark = pytest.mark.e2e


def code_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _serve_arguments(bash: str) -> list[str]:
    """The arguments after `blindinfer serve` in the docs' command line."""
    (line,) = [ln for ln in bash.splitlines() if "blindinfer serve" in ln]
    words = shlex.split(line.removesuffix("&").strip())
    return words[words.index("serve") + 1 :]


def _with_ports(arguments: list[str], native: int, compat: list[int]) -> list[str]:
    out, skip = [], False
    for word in arguments:
        if skip:
            skip = False
        elif word in ("--port", "--blindai-ports"):
            skip = True  # replaced below
        else:
            out.append(word)
    return [*out, "--port", str(native), "--blindai-ports", ",".join(map(str, compat))]


def test_compat_doc_blocks_say_what_the_test_runs() -> None:
    text = COMPAT_DOC.read_text()
    arguments = _serve_arguments(code_blocks(text, "bash")[0])
    assert "--simulation" in arguments and "--blindai-compat" in arguments
    port = arguments[arguments.index("--port") + 1]
    assert int(port) not in (9923, 9924, 9925)  # the native port must not shadow a compat one
    assert code_blocks(text, "python")[0].count(CONNECT) == 1


@pytest.mark.skipif(
    importlib.util.find_spec("blindai") is None,
    reason="blindai 0.6.3 is not installed: pip install --no-deps blindai==0.6.3",
)
def test_blindai_compat_first_snippet_runs_as_written(tmp_path: Path) -> None:
    text = COMPAT_DOC.read_text()
    snippet = code_blocks(text, "python")[0]
    native, *compat = _free_ports(4)
    arguments = _with_ports(_serve_arguments(code_blocks(text, "bash")[0]), native, compat)
    program = snippet.replace(CONNECT, f"{CONNECT} {compat[0]}, {compat[1]}, {compat[2]},")
    (tmp_path / "snippet.py").write_text(program)
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

    with start_server(arguments):
        done = subprocess.run(
            [sys.executable, "snippet.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    printed = ast.literal_eval(done.stdout.strip().splitlines()[-1])

    session = ort.InferenceSession(demo_model(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, demo_input()), strict=True))
    assert list(printed) == names
    for name, want in expected.items():
        got = np.asarray(printed[name], dtype=want.dtype)
        assert got.shape == want.shape and np.array_equal(got, want), name


def test_protocol_doc_lists_every_evidence_field() -> None:
    text = PROTOCOL_DOC.read_text()
    section = text[text.index("## Attestation") :]
    section = section[: section.index("\n## ", 1)]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    example = code_blocks(section, "json")[0]
    written = evidence_document_json(
        EvidenceDocument("intel-sgx", "simulation", bytes(32), b"q", "", b"c")
    )
    assert documented == list(written)
    assert re.findall(r'"(\w+)":', example) == list(written)
