"""`blindinfer chat` against a real server with the tiny generative model.

What a user sees is checked as a user would run it: a subprocess of the real command, real
TLS and evidence, the real `openai` SDK. `--once` must print exactly the greedy answer of
in-process onnxruntime-genai; prompts piped in one per line are one conversation; each
mistake is one or two lines and its documented exit status, never a traceback.
"""

from __future__ import annotations

import os
import pty
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import blindinfer
from blindinfer.cli.demo_model import demo_model
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support.greedy import greedy_chat

from .conftest import policy_for

pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

MAX_NEW_TOKENS = 32
CONFIG = ServerConfig(simulation=True, limits=Limits(workers=1, max_new_tokens=MAX_NEW_TOKENS))


@pytest.fixture(scope="module")
def chat_server() -> Iterator[ServerProcess]:
    args = ["--simulation", "--workers=1", f"--max-new-tokens={MAX_NEW_TOKENS}"]
    with start_server(args) as running:
        yield running


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    policy = policy_for(CONFIG)
    assert policy.sgx is not None
    path = tmp_path_factory.mktemp("chat") / "policy.toml"
    path.write_text(
        f'[sgx]\nmrenclave = ["{policy.sgx.mrenclave[0].hex()}"]\n'
        f'mrsigner = ["{policy.sgx.mrsigner[0].hex()}"]\nisvprodid = [1]\nmin_isvsvn = 1\n'
    )
    return path


@pytest.fixture(scope="module")
def models(chat_server: ServerProcess, tiny_llm: tuple[Path, Path]) -> Iterator[Path]:
    """The tiny model uploaded as "tiny", and a tensor model as "classifier"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        client = blindinfer.connect(chat_server.url, policy=policy_for(CONFIG), simulation=True)
    with client:
        client.upload_model(tiny_llm[1], name="tiny")
        client.upload_model(demo_model(), name="classifier")
        yield tiny_llm[1]


def chat(
    url: str, policy: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `blindinfer chat ARGS` with `stdin` piped in."""
    command = [sys.executable, "-m", "blindinfer.cli.main", "chat", *args]
    command += ["--url", url, "--policy", str(policy), "--simulation"]
    done = subprocess.run(
        command,
        input=stdin.encode(),
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def test_once_prints_exactly_the_greedy_answer(
    chat_server: ServerProcess, policy_file: Path, models: Path
) -> None:
    prompt = "tell me about the quiet river"
    expected = greedy_chat(models, [{"role": "user", "content": prompt}], 24)
    code, out, err = chat(
        chat_server.url, policy_file, "tiny", "--once", prompt, "--max-tokens=24",
        "--temperature=0",
    )  # fmt: skip
    assert code == 0, err
    assert out == expected + "\n"
    assert "SIMULATION MODE" in err
    assert "evidence, SIMULATION root (no TEE)" in err
    assert "mrenclave" in err and "TCB status UpToDate" in err
    assert "Traceback" not in err


def test_prompts_piped_in_are_one_conversation(
    chat_server: ServerProcess, policy_file: Path, models: Path
) -> None:
    system = {"role": "system", "content": "be brief"}
    first = {"role": "user", "content": "the river"}
    second = {"role": "user", "content": "and the stone"}
    answer1 = greedy_chat(models, [system, first], 16)
    answer2 = greedy_chat(models, [system, first, {"role": "assistant", "content": answer1},
                                   second], 16)  # fmt: skip
    code, out, err = chat(
        chat_server.url, policy_file, "tiny", "--system", "be brief", "--max-tokens=16",
        "--temperature=0", stdin="the river\n\nand the stone\n/exit\nnever sent\n",
    )  # fmt: skip
    assert code == 0, err
    assert out == answer1 + "\n" + answer2 + "\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_mistakes_are_two_lines_and_an_exit_status(
    chat_server: ServerProcess, policy_file: Path, models: Path, tmp_path: Path
) -> None:
    url = chat_server.url
    once = ("--once", "hello")
    cases: list[tuple[int, str, tuple[int, str, str]]] = [
        (4, "connection refused", chat(f"https://127.0.0.1:{_free_port()}", policy_file, "tiny",
                                       *once)),
        (2, "https://", chat(url.replace("https://", "http://"), policy_file, "tiny", *once)),
        (4, "unknown_model", chat(url, policy_file, "nope", *once)),
        (2, "is a tensor model", chat(url, policy_file, "classifier", *once)),
        (2, "--max-tokens", chat(url, policy_file, "tiny", "--max-tokens=0", *once)),
        (4, "invalid_parameter", chat(url, policy_file, "tiny",
                                      f"--max-tokens={MAX_NEW_TOKENS + 1}", *once)),
    ]  # fmt: skip
    # the openai extra missing: an `openai` package that cannot be imported comes first
    blocker = tmp_path / "no-openai" / "openai"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('not installed')\n")
    cases.append(
        (2, "blindinfer[openai]", chat(url, policy_file, "tiny", *once,
                                       env={"PYTHONPATH": str(blocker.parent)}))
    )  # fmt: skip
    for status, words, (code, out, err) in cases:
        lines = [line for line in err.splitlines() if not line.startswith("WARNING: SIMULATION")]
        assert code == status, (words, err)
        assert words in err, err
        assert "Traceback" not in err and out == ""
        assert len([line for line in lines if not line.startswith(("attested:", "  "))]) <= 2


def test_ctrl_c_at_the_prompt_exits_130(
    chat_server: ServerProcess, policy_file: Path, models: Path
) -> None:
    """In a terminal (a pseudo-terminal here): the prompt loop starts; Ctrl-C there exits."""
    controller, terminal = pty.openpty()
    command = [sys.executable, "-m", "blindinfer.cli.main", "chat", "tiny", "--url",
               chat_server.url, "--policy", str(policy_file), "--simulation"]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    os.close(terminal)
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:
            seen.append(line)
            if line.startswith("type a message"):
                break
        assert seen and seen[-1].startswith("type a message"), seen
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
        assert "interrupted" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


class _CtrlCOnFirstToken:
    """An output that is interrupted (as by Ctrl-C) when the first token is written."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def write(self, text: str) -> int:
        self.written.append(text)
        if len(self.written) == 1:
            raise KeyboardInterrupt
        return len(text)

    def flush(self) -> None:
        pass


def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on(
    chat_server: ServerProcess, models: Path
) -> None:
    """Ctrl-C lands while the first token is printed: the stream is closed (which is what
    makes the server cancel: test_generative_e2e's abandoned stream), the turn is not kept,
    and the next prompt gets the answer a fresh conversation would."""
    import io

    from blindinfer.cli.chat import Conversation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        client = blindinfer.connect(chat_server.url, policy=policy_for(CONFIG), simulation=True)
    with client, client.openai() as sdk:
        options = {"max_tokens": MAX_NEW_TOKENS, "temperature": 0}
        conversation = Conversation(sdk, "tiny", options)
        assert conversation.ask("the river", _CtrlCOnFirstToken()) is None  # type: ignore[arg-type]
        assert conversation.messages == []
        out = io.StringIO()
        answer = conversation.ask("the stone", out)
    expected = greedy_chat(models, [{"role": "user", "content": "the stone"}], MAX_NEW_TOKENS)
    assert answer == expected and out.getvalue() == expected + "\n"
    assert conversation.messages[0] == {"role": "user", "content": "the stone"}
