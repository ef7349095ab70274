"""Generative models on a real server: upload a folder, chat through the `openai` SDK.

The tiny random Llama (tests/support/tiny_llm.py) is uploaded as a folder over attested TLS;
the official `openai` SDK, built by `Client.openai()` on blindinfer's pinned connection, gets
greedy answers that must equal in-process onnxruntime-genai on the same folder, token for
token. Refusals are checked in OpenAI's error shape with blindinfer's codes.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

import blindinfer
from blindinfer.cli.proxy import READY_PREFIX
from blindinfer.protocol.generation import SamplingParams
from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support.tenants import owner_keys

from .conftest import GENERATIVE_MAX_NEW_TOKENS as MAX_NEW_TOKENS
from .conftest import policy_for

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "tell me about the quiet river"}]
SECRET = "tell me about the quiet river"


@pytest.fixture(scope="module")
def tiny(gen_client: blindinfer.Client, tiny_llm: tuple[Path, Path]) -> str:
    info = gen_client.upload_model(tiny_llm[1], name="tiny")
    assert info.kind == "generative"
    return info.name


@pytest.fixture(scope="module")
def sdk(gen_client: blindinfer.Client) -> Any:
    return gen_client.openai()


def in_process(folder: Path, max_tokens: int) -> tuple[str, int, int]:
    """Greedy text, completion and prompt token counts of in-process onnxruntime-genai."""
    session = GenerativeSession(folder, RuntimeOptions(intra_op_threads=1))
    ids = session.chat_prompt_ids(MESSAGES)
    with session.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)) as gen:
        text = "".join(token.text for token in gen)
    return text, gen.completion_tokens, len(ids)


def test_an_uploaded_folder_is_a_generative_model(tiny: str, raw: httpx.Client) -> None:
    index = raw.post("/v2/repository/index").json()
    assert [m["kind"] for m in index if m["name"] == tiny] == ["generative"]
    metadata = raw.get(f"/v2/models/{tiny}").json()
    assert metadata["parameters"]["kind"] == "generative"
    assert metadata["platform"] == "onnxruntime_genai"


def test_models_lists_generative_models_only(tiny: str, sdk: Any) -> None:
    assert [m.id for m in sdk.models.list().data] == [tiny]


def test_greedy_chat_equals_in_process(tiny: str, sdk: Any, tiny_llm: tuple[Path, Path]) -> None:
    text, tokens, prompt_tokens = in_process(tiny_llm[1], 24)
    answer = sdk.chat.completions.create(
        model=tiny, messages=MESSAGES, max_tokens=24, temperature=0
    )
    assert answer.choices[0].message.content == text
    assert answer.usage.completion_tokens == tokens
    assert answer.usage.prompt_tokens == prompt_tokens

    stream = sdk.chat.completions.create(
        model=tiny,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == tokens
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [answer.choices[0].finish_reason]


def test_async_openai_streams_the_same_answer(
    tiny: str, gen_client: blindinfer.Client, sdk: Any
) -> None:
    whole = sdk.chat.completions.create(model=tiny, messages=MESSAGES, max_tokens=12, temperature=0)

    async def scenario() -> str:
        async with gen_client.async_openai() as sdk_async:
            stream = await sdk_async.chat.completions.create(
                model=tiny, messages=MESSAGES, max_tokens=12, temperature=0, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(scenario()) == whole.choices[0].message.content


def test_text_completion(tiny: str, sdk: Any) -> None:
    answer = sdk.completions.create(model=tiny, prompt="the river", max_tokens=5, temperature=0)
    assert answer.usage.completion_tokens <= 5
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_refusals_have_openai_shape_and_our_codes(tiny: str, sdk: Any) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="nope", messages=MESSAGES)
    assert missing.value.body["code"] == "unknown_model"
    with pytest.raises(openai.BadRequestError) as several:
        sdk.chat.completions.create(model=tiny, messages=MESSAGES, n=2)
    assert several.value.body["code"] == "unsupported_parameter"
    assert several.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as too_many:
        sdk.chat.completions.create(model=tiny, messages=MESSAGES, max_tokens=MAX_NEW_TOKENS + 1)
    assert too_many.value.body["code"] == "invalid_parameter"


def test_a_hostile_archive_is_refused(raw: httpx.Client) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("../model.onnx")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    reply = raw.put(
        "/v2/repository/models/evil/upload",
        content=buffer.getvalue(),
        headers={"content-type": "application/x-tar"},
    )
    assert reply.status_code == 400
    assert reply.json()["code"] == "invalid_model_archive"


def test_an_abandoned_stream_frees_the_worker(tiny: str, sdk: Any) -> None:
    stream = sdk.chat.completions.create(
        model=tiny, messages=MESSAGES, max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()  # the client goes away mid-answer
    started = time.monotonic()
    answer = sdk.chat.completions.create(model=tiny, messages=MESSAGES, max_tokens=2)
    assert answer.usage.completion_tokens <= 2
    assert time.monotonic() - started < 30  # one worker: it was free for this request


def test_no_prompt_or_answer_in_the_log(tiny: str, sdk: Any, log_file: Path) -> None:
    sdk.chat.completions.create(model=tiny, messages=MESSAGES, max_tokens=4)
    assert SECRET not in log_file.read_text()


def test_the_openai_sdk_streams_through_the_attesting_proxy(
    gen_server: ServerProcess, tiny: str, sdk: Any, tmp_path: Path
) -> None:
    """The unmodified SDK pointed at `blindinfer proxy` (plain HTTP locally, attested and
    pinned upstream) gets the same greedy stream as through client.openai()."""
    import openai

    policy = policy_for(
        ServerConfig(simulation=True, limits=Limits(workers=1, max_new_tokens=MAX_NEW_TOKENS))
    )
    assert policy.sgx is not None
    toml = tmp_path / "policy.toml"
    toml.write_text(
        f'[sgx]\nmrenclave = ["{policy.sgx.mrenclave[0].hex()}"]\n'
        f'mrsigner = ["{policy.sgx.mrsigner[0].hex()}"]\nisvprodid = [1]\nmin_isvsvn = 1\n'
    )
    command = [sys.executable, "-m", "blindinfer.cli.proxy", "--policy", str(toml)]
    command += ["--upstream", gen_server.url, "--listen", "127.0.0.1:0", "--simulation"]
    direct = sdk.chat.completions.create(
        model=tiny, messages=MESSAGES, max_tokens=24, temperature=0
    ).choices[0]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(READY_PREFIX) and "(attested)" in line, line
        local = line[len(READY_PREFIX) :].split(" ")[0]
        through = openai.OpenAI(base_url=local + "/v1", api_key="unused", max_retries=0)
        stream = through.chat.completions.create(
            model=tiny, messages=MESSAGES, max_tokens=24, temperature=0, stream=True
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            direct.message.content
        )
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
            direct.finish_reason
        )
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def test_delete(gen_client: blindinfer.Client, sdk: Any, tiny: str) -> None:
    gen_client.delete_model(tiny)
    assert sdk.models.list().data == []
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model=tiny, messages=MESSAGES)


def test_tenants_see_and_run_only_their_models(tmp_path: Path, tiny_llm: tuple[Path, Path]) -> None:
    """With API keys: the owner lists and chats; another tenant gets the same 404 as for a
    missing model; no key is a 401, all in OpenAI's error shape."""
    auth, keys = owner_keys(tmp_path)
    policy = policy_for(ServerConfig(simulation=True))
    with start_server(["--simulation", f"--auth-file={auth}"]) as server:
        clients = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            for tenant in ("a", "b"):
                clients[tenant] = blindinfer.connect(
                    server.url, policy=policy, simulation=True, api_key=keys[tenant]
                )
            anonymous = blindinfer.connect(server.url, policy=policy, simulation=True)
        try:
            clients["a"].upload_model(tiny_llm[1], name="mine")
            owner, other = clients["a"].openai(), clients["b"].openai()
            assert [m.id for m in owner.models.list().data] == ["mine"]
            assert other.models.list().data == []
            answer = owner.chat.completions.create(model="mine", messages=MESSAGES, max_tokens=3)
            assert answer.usage.completion_tokens <= 3
            with pytest.raises(openai.NotFoundError) as hidden:
                other.chat.completions.create(model="mine", messages=MESSAGES, max_tokens=3)
            assert hidden.value.body["code"] == "unknown_model"
            with pytest.raises(openai.AuthenticationError) as nobody:
                anonymous.openai().models.list()
            assert nobody.value.body["type"] == "authentication_error"
        finally:
            for connected in (*clients.values(), anonymous):
                connected.close()


def test_cli_uploads_a_folder(
    gen_server: ServerProcess,
    gen_client: blindinfer.Client,
    raw: httpx.Client,
    tiny_llm: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    import json
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "blindinfer.cli.main", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    made = cli("policy", "--from", gen_server.url, "--simulation")
    assert made.returncode == 0, made.stderr
    policy = tmp_path / "policy.toml"
    policy.write_text(made.stdout)
    url = ["--url", gen_server.url, "--policy", str(policy), "--simulation"]
    uploaded = cli("upload", str(tiny_llm[1]), "--name", "from-cli", *url)
    assert uploaded.returncode == 0, uploaded.stderr
    assert json.loads(uploaded.stdout.strip().splitlines()[-1])["name"] == "from-cli"
    index = raw.post("/v2/repository/index").json()
    assert [m["kind"] for m in index if m["name"] == "from-cli"] == ["generative"]
    gen_client.delete_model("from-cli")


@pytest.mark.slow
def test_a_converted_real_model_streams_what_onnxruntime_genai_says(
    gen_client: blindinfer.Client, sdk: Any, smollm2_folder: Path
) -> None:
    """The issue's real model: SmolLM2-135M-Instruct from its GGUF, converted to int4 by
    `blindinfer convert`, uploaded as a folder and streamed through the openai SDK, greedy
    and token for token what in-process onnxruntime-genai says on the same folder."""
    messages = [{"role": "user", "content": "What is the capital of France? One sentence."}]
    session = GenerativeSession(smollm2_folder, RuntimeOptions(intra_op_threads=1))
    ids = session.chat_prompt_ids(messages)
    with session.generate(ids, SamplingParams(max_tokens=32, temperature=0.0)) as gen:
        expected = "".join(token.text for token in gen)
    tokens = gen.completion_tokens
    gen_client.upload_model(str(smollm2_folder), name="smollm2")
    try:
        stream = sdk.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in expected
        assert streamed == expected
        assert (chunks[-1].usage.completion_tokens, chunks[-1].usage.prompt_tokens) == (
            tokens,
            len(ids),
        )
    finally:
        gen_client.delete_model("smollm2")
