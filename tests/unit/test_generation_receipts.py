"""Generation receipts: the documented digests (exact values), the payload, where the receipt
rides in OpenAI responses and streams, and the client's check of a transcript."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindinfer.client.receipts import (
    _transcript,
    certificate_public_key,
    check_generation,
    receipt_and_text,
    verify_generation_receipt,
)
from blindinfer.errors import ProtocolError
from blindinfer.protocol import sse
from blindinfer.protocol.generation import SamplingParams, Usage
from blindinfer.protocol.openai_responses import (
    ChatCompletionStream,
    CompletionStream,
    chat_completion,
    text_completion,
)
from blindinfer.protocol.receipts import (
    canonical_text_json,
    generation_fields,
    parse_and_verify_jws,
    prompt_digest,
    prompt_document,
    sign_receipt,
    text_digest,
    token_ids_digest,
)
from blindinfer.server.tls import make_tls_identity

MESSAGES = [
    {"role": "system", "content": "Réponds brièvement."},
    {"role": "user", "content": "Hi 👋"},
]
# hashed by hand (docs/receipts.md): the UTF-8 bytes of
# {"messages":[{"content":"Réponds brièvement.","role":"system"},{"content":"Hi 👋","role":"user"}]}
MESSAGES_DIGEST = "7aa90b677f830c024a94191fd9db45f2f175c3f5c6a50b8a583d77fb027c30d2"
PROMPT_DIGEST = (
    "8361abc0683a9457df79d01c9d75ac06f975fe0caa472a5b0f114f8ea3c3c888"  # "Once upon a time"
)
IDS_DIGEST = "4cce4ffd3b07ffb2139196f2e9112a30f970eae20aa98e082c020c9118bc3a4c"  # u32 LE 1, 2, 256
OUTPUT_DIGEST = "3498ad97331172ff8413b4fbd61c4f967b57f50cdcc4ac98abc0804c8651ffa7"  # "Bonjour ✓"
SAMPLING = SamplingParams(max_tokens=8, temperature=0.7, top_k=5, seed=42, stop=("\n",))


def test_prompt_digest_is_the_documented_encoding() -> None:
    encoded = (
        '{"messages":[{"content":"Réponds brièvement.","role":"system"},'
        '{"content":"Hi 👋","role":"user"}]}'
    ).encode()
    assert canonical_text_json(prompt_document(messages=MESSAGES)) == encoded
    assert hashlib.sha256(encoded).hexdigest() == MESSAGES_DIGEST
    assert prompt_digest(messages=MESSAGES) == MESSAGES_DIGEST
    assert prompt_digest(prompt="Once upon a time") == PROMPT_DIGEST
    assert hashlib.sha256(b'{"prompt":"Once upon a time"}').hexdigest() == PROMPT_DIGEST


def test_prompt_digest_covers_what_the_server_saw() -> None:
    # text parts are joined with "\n" (as the server does), a one-prompt list is the prompt
    parts: list[dict[str, Any]] = [
        MESSAGES[0],
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "👋"}],
        },
    ]
    joined = [MESSAGES[0], {"role": "user", "content": "Hi\n👋"}]
    assert prompt_digest(messages=parts) == prompt_digest(messages=joined)
    assert prompt_digest(prompt=["Once upon a time"]) == PROMPT_DIGEST
    # role, content and order all count; chat and text prompts never collide
    assert prompt_digest(messages=MESSAGES[::-1]) != MESSAGES_DIGEST
    assert prompt_digest(messages=[{"role": "user", "content": "x"}]) != prompt_digest(
        messages=[{"role": "system", "content": "x"}]
    )
    assert prompt_digest(prompt="x") != prompt_digest(messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "prompt"),
    [
        (None, None),
        (MESSAGES, "both"),
        ("not a list", None),
        ([{"content": "no role"}], None),
        ([{"role": "user", "content": [{"type": "image_url"}]}], None),
        ([{"role": "user", "content": []}], None),
        (None, ["two", "prompts"]),
        (None, 7),
    ],
)
def test_a_malformed_prompt_is_refused(messages: Any, prompt: Any) -> None:
    with pytest.raises(ValueError, match=r"prompt|messages|content"):
        prompt_digest(messages=messages, prompt=prompt)


def test_token_and_text_digests_are_the_documented_encoding() -> None:
    assert struct.pack("<3I", 1, 2, 256).hex() == "010000000200000000010000"
    assert token_ids_digest([1, 2, 256]) == IDS_DIGEST
    assert token_ids_digest([]) == hashlib.sha256(b"").hexdigest()
    assert text_digest("Bonjour ✓") == OUTPUT_DIGEST
    for bad in ([-1], [1 << 32], [True], [1.0]):
        with pytest.raises(ValueError, match="token ids"):
            token_ids_digest(bad)  # type: ignore[arg-type]


def _fields(**changes: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "prompt": prompt_document(messages=MESSAGES),
        "sampling": SAMPLING.as_dict(),
        "output_text": "Bonjour ✓",
        "finish_reason": "stop",
        "prompt_token_ids": [1, 2, 256],
        "output_token_ids": [7, 8],
    }
    return generation_fields(**(options | changes))


def test_generation_fields() -> None:
    assert _fields() == {
        "prompt_digest": MESSAGES_DIGEST,
        "prompt_tokens_digest": IDS_DIGEST,
        "output_digest": OUTPUT_DIGEST,
        "output_tokens_digest": token_ids_digest([7, 8]),
        "sampling": {
            "max_tokens": 8,
            "temperature": 0.7,
            "top_p": 1.0,
            "top_k": 5,
            "seed": 42,
            "stop": ["\n"],
        },
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    with pytest.raises(ValueError, match="prompt_document"):
        _fields(prompt={"text": "the worker's form, not the receipt's"})


IDENTITY = make_tls_identity()


def _receipt(**changes: Any) -> dict[str, str]:
    payload = {"v": 1, "kind": "generation", "request_id": "chatcmpl-1", "time": 1} | _fields()
    return sign_receipt(payload | changes, IDENTITY.sign, IDENTITY.key_id)


def test_verify_generation_receipt_recomputes_the_transcript() -> None:
    payload = verify_generation_receipt(
        _receipt(),
        IDENTITY.certificate_der,
        messages=MESSAGES,
        output="Bonjour ✓",
        prompt_token_ids=[1, 2, 256],
        output_token_ids=[7, 8],
    )
    assert payload["prompt_digest"] == MESSAGES_DIGEST
    spoiled: list[dict[str, Any]] = [
        {"output": "Bonjour ✗"},
        {"messages": [*MESSAGES, {"role": "user", "content": "and more"}]},
        {"prompt": "Once upon a time"},
        {"output_token_ids": [7, 9]},
        {"prompt_token_ids": [1, 2]},
    ]
    for change in spoiled:
        options: dict[str, Any] = {"messages": MESSAGES, "output": "Bonjour ✓"} | change
        if "prompt" in change:
            del options["messages"]
        with pytest.raises(ProtocolError, match="does not match"):
            verify_generation_receipt(_receipt(), IDENTITY.certificate_der, **options)
    with pytest.raises(ProtocolError, match="the output is not the one the receipt signs"):
        verify_generation_receipt(_receipt(), IDENTITY.certificate_der, output="tampered")


def test_a_receipt_of_another_kind_or_key_is_refused() -> None:
    with pytest.raises(ProtocolError, match="expected a generation receipt"):
        verify_generation_receipt(_receipt(kind="inference"), IDENTITY.certificate_der)
    other = make_tls_identity()
    with pytest.raises(ProtocolError, match="another key"):
        verify_generation_receipt(_receipt(), other.certificate_der, output="Bonjour ✓")


# --- where the receipt rides ------------------------------------------------------------

RECEIPT = {"protected": "aGVhZGVy", "payload": "cGF5bG9hZA", "signature": "c2ln"}
USAGE = Usage(prompt_tokens=3, completion_tokens=2)


def _events(raw: bytes) -> list[Any]:
    """The JSON of each event of a stream, up to its `[DONE]` (which must end it)."""
    assert raw.endswith(sse.DONE)
    lines = raw[: -len(sse.DONE)].decode().split("\n\n")
    return [json.loads(line.removeprefix("data: ")) for line in lines if line]


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_carries_its_receipt_on_its_last_chunk(include_usage: bool) -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletionChunk

    for stream, model in (
        (ChatCompletionStream("chatcmpl-1", 1, "m", include_usage), ChatCompletionChunk),
        (CompletionStream("cmpl-1", 1, "m", include_usage), Completion),
    ):
        chunks = _events(stream.text("Hi") + stream.end("stop", USAGE, RECEIPT))
        assert [c.get("receipt") for c in chunks] == [None] * (len(chunks) - 1) + [RECEIPT]
        last = model.model_validate(chunks[-1])
        assert last.model_extra is not None and last.model_extra["receipt"] == RECEIPT
        if include_usage:  # the usage chunk is the last one, as OpenAI sends it
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
        else:  # the finish chunk: code reading chunk.choices[0] keeps working
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert receipt_and_text(last) == (RECEIPT, None)  # a chunk is not the whole answer
        # no receipt: the same bytes as before receipts existed
        plain = _events(stream.end("stop", USAGE))
        assert all("receipt" not in c for c in plain)


def test_a_whole_completion_carries_its_receipt() -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    chat = json.loads(
        chat_completion(
            id="chatcmpl-1",
            created=1,
            model="m",
            content="Bonjour ✓",
            finish_reason="stop",
            usage=USAGE,
            receipt=RECEIPT,
        )
    )
    assert chat["receipt"] == RECEIPT
    assert receipt_and_text(ChatCompletion.model_validate(chat)) == (RECEIPT, "Bonjour ✓")
    assert receipt_and_text(chat) == (RECEIPT, "Bonjour ✓")
    text = json.loads(
        text_completion(
            id="cmpl-1",
            created=1,
            model="m",
            text="Bonjour ✓",
            finish_reason="length",
            usage=USAGE,
            receipt=RECEIPT,
        )
    )
    assert receipt_and_text(Completion.model_validate(text)) == (RECEIPT, "Bonjour ✓")
    assert receipt_and_text(RECEIPT) == (RECEIPT, None)
    del chat["receipt"]
    with pytest.raises(ProtocolError, match="no receipt"):
        receipt_and_text(ChatCompletion.model_validate(chat))


# --- the transcript parser: any JSON is a clean refusal or a check ------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_fields_json = st.fixed_dictionaries(
    {},
    optional={
        "messages": _json
        | st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=20)}
            ),
            max_size=3,
        ),
        "prompt": _json,
        "output": _json,
        "prompt_token_ids": _json | st.lists(st.integers(), max_size=4),
        "output_token_ids": _json | st.lists(st.integers(), max_size=4),
    },
)
PAYLOAD = parse_and_verify_jws(_receipt(), certificate_public_key(IDENTITY.certificate_der))


@settings(max_examples=300, deadline=None)
@given(_fields_json)
def test_any_transcript_is_checked_or_refused_cleanly(document: dict[str, Any]) -> None:
    code = None
    try:
        checked = check_generation(PAYLOAD, **_transcript(document))
    except ProtocolError as exc:
        code = exc.code
    if code is not None:
        assert code in ("invalid_receipt", "malformed_proof")
    else:  # nothing random is the signed transcript: only an empty one passes
        assert checked == []
        assert all(document.get(k) is None for k in ("messages", "prompt", "output"))
        assert not {"prompt_token_ids", "output_token_ids"} & set(document)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text()}
        ),
        min_size=1,
        max_size=4,
    ),
    st.text(),
)
def test_a_saved_transcript_verifies_after_a_json_round_trip(
    messages: list[dict[str, str]], output: str
) -> None:
    fields = _fields(prompt=prompt_document(messages=messages), output_text=output)
    payload = {"kind": "generation"} | fields
    saved = json.loads(json.dumps({"messages": messages, "output": output}))
    assert check_generation(payload, **_transcript(saved)) == ["prompt", "output"]


def test_the_documented_recipe_recomputes_a_saved_transcript(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The python snippet of docs/receipts.md, run as written on a saved transcript."""
    docs = (Path(__file__).parents[2] / "docs" / "receipts.md").read_text(encoding="utf-8")
    recipe = docs.split("## Recomputing a generation's digests", 1)[1]
    code = recipe.split("```python\n", 1)[1].split("```", 1)[0]
    transcript = {
        "receipt": _receipt(),
        "messages": MESSAGES,
        "output": "Bonjour ✓",
        "prompt_token_ids": [1, 2, 256],
        "output_token_ids": [7, 8],
    }
    monkeypatch.chdir(tmp_path)
    (tmp_path / "transcript.json").write_text(json.dumps(transcript), encoding="utf-8")
    exec(compile(code, "docs/receipts.md", "exec"), {})
    (tmp_path / "transcript.json").write_text(
        json.dumps(transcript | {"output": "Bonjour ✗"}), encoding="utf-8"
    )
    with pytest.raises(AssertionError):
        exec(compile(code, "docs/receipts.md", "exec"), {})
