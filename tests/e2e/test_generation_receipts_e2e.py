"""Every answer proven: generation receipts from a real server, through the `openai` SDK.

The tiny random Llama (tests/support/tiny_llm.py) is uploaded to a real server process; the
official `openai` SDK from `Client.openai()` streams and fetches completions. Each carries a
receipt (a stream: on its last chunk) that the client verifies against the transcript, that
`blindinfer verify-receipt` verifies offline from a saved transcript, whose token digests
are those of in-process onnxruntime-genai's tokenizer and tokens, and that refuses a
transcript whose answer was changed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blindinfer
from blindinfer.client.receipts import verify_generation_receipt
from blindinfer.errors import ProtocolError
from blindinfer.protocol.generation import SamplingParams
from blindinfer.protocol.receipts import prompt_digest, text_digest, token_ids_digest
from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server

from .conftest import policy_for

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

MAX_NEW_TOKENS = 32
MESSAGES = [
    {"role": "system", "content": "answer in one line"},
    {"role": "user", "content": "tell me about the quiet river"},
]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    args = ["--simulation", "--workers=1", f"--max-new-tokens={MAX_NEW_TOKENS}"]
    with start_server(args) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[blindinfer.Client]:
    config = ServerConfig(simulation=True, limits=Limits(workers=1, max_new_tokens=MAX_NEW_TOKENS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        connected = blindinfer.connect(server.url, policy=policy_for(config), simulation=True)
    with connected:
        yield connected


@pytest.fixture(scope="module")
def policy_file(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.toml"
    made = cli("policy", "--from", server.url, "--simulation")
    assert made.returncode == 0, made.stderr
    path.write_text(made.stdout)
    return path


@pytest.fixture(scope="module")
def tiny(client: blindinfer.Client, tiny_llm: tuple[Path, Path]) -> str:
    return client.upload_model(tiny_llm[1], name="tiny").name


@pytest.fixture(scope="module")
def sdk(client: blindinfer.Client) -> Any:
    return client.openai()


def verify_offline(policy_file: Path, transcript: Path) -> subprocess.CompletedProcess[str]:
    return cli("verify-receipt", "--policy", str(policy_file), "--simulation", str(transcript))


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_chat_receipt_verifies_offline(
    tiny: str,
    sdk: Any,
    client: blindinfer.Client,
    policy_file: Path,
    tmp_path: Path,
    include_usage: bool,
) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = sdk.chat.completions.create(
        model=tiny, messages=MESSAGES, max_tokens=16, temperature=0, stream=True, **options
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # the receipt rides on the last chunk only, never as a chunk of its own
    assert [c.model_extra.get("receipt") is not None for c in chunks] == [False] * (
        len(chunks) - 1
    ) + [True]
    if not include_usage:
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    receipt = client.verify_generation(chunks[-1], messages=MESSAGES, output=text)
    payload = receipt.payload
    assert payload["kind"] == "generation" and payload["request_id"] == chunks[-1].id
    assert payload["prompt_digest"] == prompt_digest(messages=MESSAGES)
    assert payload["output_digest"] == text_digest(text)
    assert payload["sampling"]["temperature"] == 0.0 and payload["sampling"]["max_tokens"] == 16

    receipt.save(tmp_path / "transcript.json")
    ok = verify_offline(policy_file, tmp_path / "transcript.json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "VALID" in ok.stdout and "prompt, output match the transcript" in ok.stdout

    # one character of the answer changed: refused, saying which digest does not match
    saved = json.loads((tmp_path / "transcript.json").read_text())
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps({**saved, "output": text + "!"}))
    refused = verify_offline(policy_file, tampered)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stdout.startswith("REFUSED: ")
    assert "output_digest does not match: the output is not the one the receipt signs" in (
        refused.stdout
    )
    with pytest.raises(ProtocolError, match="output_digest does not match"):
        client.verify_generation(chunks[-1], messages=MESSAGES, output=text + "!")
    with pytest.raises(ProtocolError, match="prompt_digest does not match"):
        client.verify_generation(chunks[-1], messages=MESSAGES[1:], output=text)


def test_whole_responses_carry_receipts(tiny: str, sdk: Any, client: blindinfer.Client) -> None:
    answer = sdk.chat.completions.create(model=tiny, messages=MESSAGES, max_tokens=8, temperature=0)
    receipt = client.verify_generation(answer, messages=MESSAGES)  # the output is its content
    assert receipt.transcript["output"] == answer.choices[0].message.content
    assert receipt.payload["request_id"] == answer.id
    assert receipt.payload["usage"] == {
        "prompt_tokens": answer.usage.prompt_tokens,
        "completion_tokens": answer.usage.completion_tokens,
    }
    assert receipt.payload["finish_reason"] == answer.choices[0].finish_reason
    # with nothing but the server's certificate, from the raw JSON, as a third party would
    jws = answer.model_extra["receipt"]
    verify_generation_receipt(
        jws,
        client.attestation.certificate_der,
        messages=MESSAGES,
        output=answer.choices[0].message.content,
    )

    text = sdk.completions.create(
        model=tiny, prompt="the quiet river", max_tokens=6, temperature=0.8, seed=7
    )
    receipt = client.verify_generation(text, prompt="the quiet river")
    assert receipt.payload["sampling"]["seed"] == 7
    assert receipt.payload["prompt_digest"] == prompt_digest(prompt="the quiet river")
    with pytest.raises(ProtocolError, match="prompt_digest does not match"):
        client.verify_generation(text, messages=[{"role": "user", "content": "the quiet river"}])


def test_token_digests_are_those_of_in_process_onnxruntime_genai(
    tiny: str,
    sdk: Any,
    client: blindinfer.Client,
    tiny_llm: tuple[Path, Path],
    policy_file: Path,
    tmp_path: Path,
) -> None:
    answer = sdk.chat.completions.create(
        model=tiny, messages=MESSAGES, max_tokens=12, temperature=0
    )
    session = GenerativeSession(tiny_llm[1], RuntimeOptions(intra_op_threads=1))
    prompt_ids = session.chat_prompt_ids(MESSAGES)
    with session.generate(prompt_ids, SamplingParams(max_tokens=12, temperature=0.0)) as gen:
        output_ids = [token.token_id for token in gen]
    payload = client.verify_generation(answer, messages=MESSAGES).payload
    assert payload["prompt_tokens_digest"] == token_ids_digest(prompt_ids)
    assert payload["output_tokens_digest"] == token_ids_digest(output_ids)
    assert payload["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(output_ids),
    }

    # the offline check recomputes token digests too when the transcript holds the ids
    receipt = client.verify_generation(answer, messages=MESSAGES)
    document = receipt.to_dict() | {"prompt_token_ids": prompt_ids, "output_token_ids": output_ids}
    (tmp_path / "with_ids.json").write_text(json.dumps(document))
    ok = verify_offline(policy_file, tmp_path / "with_ids.json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "prompt, output, prompt tokens, output tokens match the transcript" in ok.stdout
    document["output_token_ids"] = [*output_ids[:-1], output_ids[-1] ^ 1]
    (tmp_path / "wrong_ids.json").write_text(json.dumps(document))
    refused = verify_offline(policy_file, tmp_path / "wrong_ids.json")
    assert refused.returncode == 1 and "output_tokens_digest does not match" in refused.stdout
