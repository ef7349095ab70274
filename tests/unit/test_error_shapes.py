"""One rule for the shape of errors no route writes itself: OpenAI's on /v1, OIP's elsewhere.

The server's answers are checked end to end in tests/e2e/test_oip_generate_e2e.py (a 415
on /v1 in OpenAI's shape); here the rule itself, and the proxy, which refuses the same
Content-Types before forwarding (its app, in memory: the refusal comes before any
upstream is needed).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

import blindinfer
from blindinfer.protocol.error_shapes import error_body, error_document, speaks_openai
from blindinfer.protocol.inference import encode_error
from blindinfer.proxy.forward import AttestingProxy, ProxyConfig


@pytest.mark.parametrize(
    ("path", "openai"),
    [
        ("/v1", True),
        ("/v1/", True),
        ("/v1/chat/completions", True),
        ("/v1/completions", True),
        ("/v1/models", True),
        ("/v1x", False),
        ("/v10/completions", False),
        ("/v2/models/m/generate", False),
        ("/v2/models/v1/infer", False),
        ("/", False),
        ("", False),
    ],
)
def test_which_paths_speak_openai(path: str, openai: bool) -> None:
    assert speaks_openai(path) is openai


def test_oip_errors_are_unchanged() -> None:
    for path in ("/v2/repository/index", "/v2/models/m/infer", "/"):
        assert error_body(path, 415, "unsupported_media_type", "no") == encode_error(
            "unsupported_media_type", "no"
        )
        assert error_document(path, 415, "c", "m") == {"error": "m", "code": "c"}


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (415, "invalid_request_error"),
        (413, "invalid_request_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (401, "authentication_error"),
        (503, "server_error"),
    ],
)
def test_openai_errors_carry_message_type_param_and_our_code(status: int, kind: str) -> None:
    body = json.loads(error_body("/v1/completions", status, "some_code", "a message"))
    expected = {"message": "a message", "type": kind, "param": None, "code": "some_code"}
    assert body == {"error": expected}
    assert error_document("/v1/completions", status, "some_code", "a message") == body


def proxy_answer(path: str, content_type: str) -> httpx.Response:
    """What the proxy answers a local request, before anything goes upstream."""
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(bytes(32),), mrsigner=(bytes(32),), isvprodid=(1,), min_isvsvn=1
        )
    )
    config = ProxyConfig(upstream="https://127.0.0.1:9", policy=policy, simulation=True)
    app = AttestingProxy(config)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1:8000"
        ) as local:
            return await local.post(path, content=b"{}", headers={"content-type": content_type})

    return asyncio.run(send())


def test_the_proxy_refuses_a_wrong_content_type_in_the_routes_own_shape() -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        reply = proxy_answer(path, "text/plain")
        assert reply.status_code == 415
        error = reply.json()["error"]
        assert error["code"] == "unsupported_media_type"
        assert error["type"] == "invalid_request_error"
        assert "text/plain" in error["message"]
    oip = proxy_answer("/v2/models/m/generate", "application/x-www-form-urlencoded")
    assert oip.status_code == 415
    assert oip.json()["code"] == "unsupported_media_type"
    assert isinstance(oip.json()["error"], str)
