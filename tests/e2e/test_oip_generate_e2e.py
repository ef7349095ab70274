"""The Open Inference Protocol's generate extension on a real server, and /v1's error shape.

The tiny random Llama (tests/support/tiny_llm.py) is uploaded over attested TLS;
`POST /v2/models/{name}/generate` and `/generate_stream` (Triton's generate extension) must
give, greedy, exactly the text and token counts `POST /v1/completions` gives for the same
prompt and parameters. Refusals are OIP's `{"error", "code"}` with the same 404 as every
other route for a model the caller cannot see; a tensor model is refused as not
generative; a client leaving a stream frees the worker. On /v1 a wrong Content-Type (what a
web page can send without a CORS preflight) is a 415 in OpenAI's error shape.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

import blindinfer
from blindinfer.client.receipts import verify_generation_receipt
from blindinfer.client.transport import pinned_context
from blindinfer.server.config import ServerConfig
from blindinfer.server.process import start_server
from support import onnx_models as zoo
from support.tenants import owner_keys

from .conftest import GENERATIVE_MAX_NEW_TOKENS as MAX_NEW_TOKENS
from .conftest import policy_for

pytestmark = pytest.mark.e2e

PROMPT = "the quiet river runs"
SECRET_PROMPT = "a secret prompt about the quiet river"
PARAMS: dict[str, Any] = {"max_tokens": 20, "temperature": 0}
SIMPLE_REQUEST_TYPES = ("text/plain", "application/x-www-form-urlencoded")


@pytest.fixture(scope="module")
def tiny(gen_client: blindinfer.Client, tiny_llm: tuple[Path, Path]) -> str:
    return gen_client.upload_model(tiny_llm[1], name="tiny-oip").name


@pytest.fixture(scope="module")
def tensor(gen_client: blindinfer.Client) -> str:
    return gen_client.upload_model(zoo.model_bytes(zoo.multi_io_model()), name="tensor-oip").name


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """The `data:` objects of a server-sent event stream, in order."""
    found = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            found.append(json.loads(line[len("data:") :]))
        else:
            assert line == "", line  # nothing but data lines and blank separators
    return found


def completion(raw: httpx.Client, model: str, prompt: str, **params: Any) -> dict[str, Any]:
    reply = raw.post("/v1/completions", json={"model": model, "prompt": prompt, **params})
    assert reply.status_code == 200, reply.text
    document: dict[str, Any] = reply.json()
    return document


def verified(receipt: object, certificate_der: bytes, output: str) -> dict[str, Any]:
    """The receipt's payload, checked offline against the prompt and the answer as received."""
    return verify_generation_receipt(receipt, certificate_der, prompt=PROMPT, output=output)


def test_generate_equals_v1_completions_token_for_token(
    raw: httpx.Client, tiny: str, gen_client: blindinfer.Client
) -> None:
    expected = completion(raw, tiny, PROMPT, **PARAMS)
    reply = raw.post(
        f"/v2/models/{tiny}/generate", json={"text_input": PROMPT, "parameters": PARAMS}
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    receipt = body.pop("receipt")
    assert body == {
        "model_name": tiny,
        "model_version": "1",
        "text_output": expected["choices"][0]["text"],
        "finish_reason": expected["choices"][0]["finish_reason"],
        "prompt_tokens": expected["usage"]["prompt_tokens"],
        "completion_tokens": expected["usage"]["completion_tokens"],
    }
    assert body["completion_tokens"] > 0
    payload = verified(receipt, gen_client.attestation.certificate_der, body["text_output"])
    assert payload["kind"] == "generation"
    assert payload["request_id"].startswith("generate-")
    models = {m.name: m for m in gen_client.list_models()}
    assert payload["model"]["sha256"] == models[tiny].sha256
    with pytest.raises(blindinfer.ProtocolError):  # another answer is not the one signed
        verified(receipt, gen_client.attestation.certificate_der, body["text_output"] + "!")
    versioned = raw.post(
        f"/v2/models/{tiny}/versions/1/generate", json={"text_input": PROMPT, "parameters": PARAMS}
    ).json()
    assert versioned.pop("receipt") != receipt  # its own request id
    assert versioned == body


def test_generate_stream_equals_v1_completions(
    raw: httpx.Client, tiny: str, gen_client: blindinfer.Client
) -> None:
    expected = completion(raw, tiny, PROMPT, **PARAMS)
    request = {"text_input": PROMPT, "parameters": {**PARAMS, "stream": True}}
    with raw.stream("POST", f"/v2/models/{tiny}/generate_stream", json=request) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        streamed = events(reply)
    *pieces, last = streamed
    assert pieces, "the text arrives as it is generated, not in the last event"
    for piece in pieces:
        assert set(piece) == {"model_name", "model_version", "text_output"}
        assert (piece["model_name"], piece["model_version"]) == (tiny, "1")
    text = "".join(p["text_output"] for p in pieces)
    assert text == expected["choices"][0]["text"]
    # the receipt arrives as the last event, and signs the answer as streamed
    verified(last.pop("receipt"), gen_client.attestation.certificate_der, text)
    assert last == {
        "model_name": tiny,
        "model_version": "1",
        "text_output": "",
        "finish_reason": expected["choices"][0]["finish_reason"],
        "prompt_tokens": expected["usage"]["prompt_tokens"],
        "completion_tokens": expected["usage"]["completion_tokens"],
    }


def test_seeded_sampling_is_reproducible(raw: httpx.Client, tiny: str) -> None:
    request = {
        "text_input": PROMPT,
        "parameters": {"max_tokens": 12, "temperature": 1.0, "top_k": 20, "seed": 7},
    }
    first = raw.post(f"/v2/models/{tiny}/generate", json=request).json()
    second = raw.post(f"/v2/models/{tiny}/generate", json=request).json()
    first.pop("receipt"), second.pop("receipt")
    assert first == second
    expected = completion(raw, tiny, PROMPT, max_tokens=12, temperature=1.0, top_k=20, seed=7)
    assert first["text_output"] == expected["choices"][0]["text"]


def test_refusals_are_oip_errors_with_our_codes(raw: httpx.Client, tiny: str) -> None:
    cases = [
        ({"text_input": PROMPT, "max_tokens": 3}, "unknown_parameter"),  # Triton: a tensor
        ({"text_input": PROMPT, "parameters": {"beam_width": 2}}, "unknown_parameter"),
        ({"parameters": {"max_tokens": 3}}, "invalid_request"),
        ({"text_input": PROMPT, "parameters": {"stream": True}}, "invalid_parameter"),
        (
            {"text_input": PROMPT, "parameters": {"max_tokens": MAX_NEW_TOKENS + 1}},
            "invalid_parameter",
        ),
    ]
    for request, code in cases:
        reply = raw.post(f"/v2/models/{tiny}/generate", json=request)
        assert reply.status_code == 400, (request, reply.text)
        body = reply.json()
        assert set(body) == {"error", "code"} and isinstance(body["error"], str)
        assert body["code"] == code, (request, body)
    streamed = raw.post(
        f"/v2/models/{tiny}/generate_stream",
        json={"text_input": PROMPT, "parameters": {"stream": False}},
    )
    assert streamed.status_code == 400
    assert streamed.json()["code"] == "invalid_parameter"
    malformed = raw.post(
        f"/v2/models/{tiny}/generate",
        content=b'{"text_input": "x", "text_input": "y"}',
        headers={"content-type": "application/json"},
    )
    assert malformed.status_code == 400
    assert set(malformed.json()) == {"error", "code"}


def test_an_unknown_model_is_the_same_404_as_on_every_other_route(raw: httpx.Client) -> None:
    infer = raw.post(
        "/v2/models/nope/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
    )
    assert infer.status_code == 404
    for path in (
        "/v2/models/nope/generate",
        "/v2/models/nope/generate_stream",
        "/v2/models/nope/versions/1/generate",
    ):
        reply = raw.post(path, json={"text_input": PROMPT})
        assert (reply.status_code, reply.content) == (404, infer.content), path
    wrong_version = raw.post(f"/v2/models/{'nope'}/versions/2/generate", json={})
    assert wrong_version.status_code == 404
    assert wrong_version.json()["code"] == "unknown_model"


def test_a_tensor_model_does_not_generate_and_a_generative_one_does_not_infer(
    raw: httpx.Client, tiny: str, tensor: str
) -> None:
    for route in ("generate", "generate_stream"):
        reply = raw.post(f"/v2/models/{tensor}/{route}", json={"text_input": PROMPT})
        assert reply.status_code == 400, reply.text
        assert reply.json()["code"] == "not_generative"
        assert "/infer" in reply.json()["error"]
    infer = raw.post(
        f"/v2/models/{tiny}/infer",
        json={"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1], "data": [1]}]},
    )
    assert infer.status_code == 400, infer.text
    assert infer.json()["code"] == "not_tensor_model"
    assert "/generate" in infer.json()["error"]


def test_leaving_a_stream_frees_the_worker(raw: httpx.Client, tiny: str) -> None:
    request = {"text_input": PROMPT, "parameters": {"max_tokens": MAX_NEW_TOKENS}}
    with raw.stream("POST", f"/v2/models/{tiny}/generate_stream", json=request) as reply:
        assert reply.status_code == 200
        first = next(reply.iter_lines())
        assert first.startswith("data:")
    # the client went away mid-answer (the connection is closed, the body unread)
    started = time.monotonic()
    answer = raw.post(
        f"/v2/models/{tiny}/generate",
        json={"text_input": PROMPT, "parameters": {"max_tokens": 2}},
    )
    assert answer.status_code == 200
    assert answer.json()["completion_tokens"] <= 2
    assert time.monotonic() - started < 30  # one worker: it was free for this request


def test_no_prompt_or_answer_in_the_log(raw: httpx.Client, tiny: str, log_file: Path) -> None:
    reply = raw.post(
        f"/v2/models/{tiny}/generate",
        json={"text_input": SECRET_PROMPT, "parameters": {"max_tokens": 8}},
    )
    assert reply.status_code == 200
    log = log_file.read_text()
    assert SECRET_PROMPT not in log
    assert reply.json()["text_output"].strip() == "" or reply.json()["text_output"] not in log


def test_a_wrong_content_type_on_v1_is_a_415_in_openai_shape(raw: httpx.Client, tiny: str) -> None:
    """The /v1 routes answer middleware refusals in their own shape (the `openai` SDK reads
    `error.message` and `error.code`); /v2 keeps OIP's."""
    body = json.dumps({"model": tiny, "prompt": PROMPT, "max_tokens": 2}).encode()
    for path in ("/v1/chat/completions", "/v1/completions"):
        for content_type in SIMPLE_REQUEST_TYPES:
            reply = raw.post(path, content=body, headers={"content-type": content_type})
            assert reply.status_code == 415, (path, content_type, reply.text)
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["code"] == "unsupported_media_type"
            assert error["type"] == "invalid_request_error"
            assert error["param"] is None
            assert content_type in error["message"]
    oip = raw.post(
        f"/v2/models/{tiny}/generate", content=b"{}", headers={"content-type": "text/plain"}
    )
    assert oip.status_code == 415
    assert set(oip.json()) == {"error", "code"}
    assert oip.json()["code"] == "unsupported_media_type"
    # and what the router itself answers on /v1 (405, 404) has OpenAI's shape too
    wrong_method = raw.get("/v1/completions")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    missing = raw.post("/v1/embeddings", json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_the_openai_sdk_reads_the_415(gen_client: blindinfer.Client, tiny: str) -> None:
    """Seen through the SDK: an `APIStatusError` with our message and code, not a bare one."""
    openai = pytest.importorskip("openai")
    sdk = gen_client.openai()
    with pytest.raises(openai.APIStatusError) as refused:
        sdk.completions.create(
            model=tiny,
            prompt=PROMPT,
            max_tokens=2,
            extra_headers={"Content-Type": "text/plain"},
        )
    assert refused.value.status_code == 415
    assert refused.value.body["code"] == "unsupported_media_type"
    assert "text/plain" in refused.value.message


def test_tenants_generate_only_with_their_models(
    tmp_path: Path, tiny_llm: tuple[Path, Path]
) -> None:
    """With API keys: the owner generates; another tenant gets the very 404 of a missing
    model (probing reveals nothing); no key is a 401, all in OIP's shape."""
    auth, keys = owner_keys(tmp_path)
    policy = policy_for(ServerConfig(simulation=True))
    with start_server(["--simulation", f"--auth-file={auth}"]) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            owner = blindinfer.connect(
                server.url, policy=policy, simulation=True, api_key=keys["a"]
            )
        with owner:
            owner.upload_model(tiny_llm[1], name="mine")
            context = pinned_context(owner.attestation.certificate_der)
            with httpx.Client(base_url=server.url, verify=context, timeout=60) as http:

                def as_tenant(tenant: str | None, path: str) -> httpx.Response:
                    headers = {} if tenant is None else {"authorization": f"Bearer {keys[tenant]}"}
                    request = {"text_input": PROMPT, "parameters": {"max_tokens": 3}}
                    return http.post(path, json=request, headers=headers)

                mine = as_tenant("a", "/v2/models/mine/generate")
                assert mine.status_code == 200, mine.text
                assert mine.json()["completion_tokens"] <= 3
                missing = as_tenant("b", "/v2/models/absent/generate")
                assert missing.status_code == 404
                for route in ("generate", "generate_stream"):
                    hidden = as_tenant("b", f"/v2/models/mine/{route}")
                    assert hidden.status_code == 404
                    assert hidden.json()["code"] == "unknown_model"
                    assert (
                        hidden.json()["error"].replace("mine", "absent")
                        == (missing.json()["error"])
                    )
                nobody = as_tenant(None, "/v2/models/mine/generate")
                assert nobody.status_code == 401
                assert set(nobody.json()) == {"error", "code"}
