"""Generation limits on a real server: abandoned answers stop in the worker, and each
tenant's tokens per minute, generations at once and KV-cache budget refuse what exceeds them.

The model is the tiny random Llama of tests/support/tiny_llm.py made longer and slower
(4096 positions, 4 layers of 256): greedy, it never emits its end token, so a generation
of 4000 tokens runs about 10 s in the worker here. That is the margin every proof below
rests on, without timing anything: a generation that was really stopped shows far fewer
than 4000 completion tokens in the server's own count (`/metrics`), and a generation
still running is what the N+1th request meets.

Each limit gets its own tenant (auth file), all running one shared model.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import blindinfer
from blindinfer.client.transport import pinned_context
from blindinfer.server.auth import generate_api_key
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server

from .conftest import policy_for

pytestmark = pytest.mark.e2e

POLICY: list[blindinfer.Policy] = []  # the server's, measured as it starts
MODEL: dict[str, str] = {}  # "ref": the shared model's id, once uploaded
LONG = 4000  # max_tokens of the generations that must be stopped; about 10 s each here
SECRET = "tell me about the quiet river"
TENANTS = {
    # defaults; its key is an admin's, polling /metrics and stats
    "free": "requests_per_second = 1000\nburst = 1000\n",
    "tpm": "tokens_per_minute = 60\n",
    "one": "max_concurrent_generations = 1\n",
    "kv": "max_kv_cache_bytes = 100_000\n",  # 4096 bytes a token: 24 tokens
}


@pytest.fixture(scope="module")
def long_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime_genai")
    from support.tiny_llm import build_tiny_llm

    root = tmp_path_factory.mktemp("long_llm")
    return build_tiny_llm(root, max_positions=4096, hidden_size=256, layers=4)[1]


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("generation-limits") / "server.log"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    made: dict[str, str] = {}
    text = ""
    for tenant, settings in TENANTS.items():
        key, sha = generate_api_key()
        made[tenant] = key
        role = "admin" if tenant == "free" else "user"
        text += (
            f'[[tenant]]\nname = "{tenant}"\n{settings}'
            f'[[tenant.key]]\nid = "{tenant}-key"\nrole = "{role}"\nsha256 = "{sha}"\n'
        )
    auth = tmp_path_factory.mktemp("auth") / "auth.toml"
    auth.write_text(text)
    made["_file"] = str(auth)
    return made


@pytest.fixture(scope="module")
def server(log_file: Path, keys: dict[str, str], long_llm: Path) -> Iterator[ServerProcess]:
    """Started after the model is built, the policy measured just before it starts."""
    config = ServerConfig(simulation=True, limits=Limits(workers=1, max_new_tokens=LONG))
    POLICY.append(policy_for(config))
    args = [
        "--simulation",
        "--workers=1",
        f"--max-new-tokens={LONG}",
        f"--auth-file={keys['_file']}",
    ]
    with log_file.open("w") as stderr, start_server(args, stderr=stderr) as running:
        yield running


@pytest.fixture(scope="module")
def admin(
    server: ServerProcess, keys: dict[str, str], long_llm: Path
) -> Iterator[blindinfer.Client]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        connected = blindinfer.connect(
            server.url, policy=POLICY[-1], simulation=True, api_key=keys["free"]
        )
    with connected:
        info = connected.upload_model(long_llm, name="long")
        connected.share_model("long", ["*"])
        MODEL["ref"] = info.model_id  # names are per tenant; the id resolves for all
        yield connected


@pytest.fixture(scope="module")
def http(admin: blindinfer.Client, keys: dict[str, str]) -> Iterator[dict[str, httpx.Client]]:
    context = pinned_context(admin.attestation.certificate_der)
    clients = {
        tenant: httpx.Client(
            base_url=admin.url,
            verify=context,
            timeout=120,
            headers={"Authorization": f"Bearer {keys[tenant]}"},
        )
        for tenant in TENANTS
    }
    yield clients
    for client in clients.values():
        client.close()


def chat(max_tokens: int, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": MODEL["ref"],
        "messages": [{"role": "user", "content": SECRET}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def text(max_tokens: int) -> dict[str, Any]:
    """A text completion: 9 bytes of prompt, so it reserves 9 + max_tokens tokens."""
    return {
        "model": MODEL["ref"],
        "prompt": "the river",
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def completion_tokens(http: dict[str, httpx.Client]) -> float:
    metrics = http["free"].get("/metrics")
    assert metrics.status_code == 200
    found = re.search(
        r'^blindinfer_generation_tokens_total\{kind="completion"\} (\S+)$', metrics.text, re.M
    )
    assert found is not None, "the server exposes no generation token counter"
    return float(found.group(1))


def running(http: dict[str, httpx.Client], tenant: str) -> int:
    reply = http["free"].get("/v2/admin/stats")
    assert reply.status_code == 200, reply.text
    stats = reply.json()
    return int(stats["generations_running_by_tenant"].get(tenant, 0))


def wait_until_idle(http: dict[str, httpx.Client], tenant: str) -> None:
    """Until the tenant runs no generation in the worker (bounded far above a cancel)."""
    deadline = time.monotonic() + 60
    while running(http, tenant) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(http, tenant) == 0


class RawRequest:
    """A request on a socket of its own over the server's pinned TLS, so that the test can
    walk away from it (close the connection) at a moment of its choosing."""

    def __init__(self, admin: blindinfer.Client, key: str, path: str, body: dict[str, Any]):
        host, port = admin.url.removeprefix("https://").rsplit(":", 1)
        context: ssl.SSLContext = pinned_context(admin.attestation.certificate_der)
        raw = socket.create_connection((host, int(port)), timeout=60)
        self.sock = context.wrap_socket(raw, server_hostname=host)
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + data)

    def read_until(self, marker: bytes) -> bytes:
        seen = b""
        while marker not in seen:
            chunk = self.sock.recv(65536)
            assert chunk, f"the connection closed before {marker!r}: {seen[:300]!r}"
            seen += chunk
        return seen

    def abandon(self) -> None:
        self.sock.close()


def test_an_abandoned_stream_stops_its_generation(
    admin: blindinfer.Client, http: dict[str, httpx.Client], keys: dict[str, str]
) -> None:
    before = completion_tokens(http)
    request = RawRequest(admin, keys["free"], "/v1/chat/completions", chat(LONG, stream=True))
    head = request.read_until(b"data: ")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    request.abandon()
    wait_until_idle(http, "free")
    stopped_at = completion_tokens(http) - before
    assert 0 < stopped_at < LONG / 4, stopped_at  # all 4000 without the cancel


def test_an_abandoned_whole_completion_stops_its_generation(
    admin: blindinfer.Client, http: dict[str, httpx.Client], keys: dict[str, str]
) -> None:
    """A non-streamed request: the server answers nothing until the end, so before this
    change a client that left kept its generation running to max_tokens."""
    before = completion_tokens(http)
    request = RawRequest(admin, keys["free"], "/v1/chat/completions", chat(LONG))
    deadline = time.monotonic() + 60
    while not running(http, "free") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running(http, "free") == 1
    request.abandon()
    wait_until_idle(http, "free")
    assert completion_tokens(http) - before < LONG / 4


def test_tokens_per_minute(http: dict[str, httpx.Client]) -> None:
    tpm = http["tpm"]  # 60 tokens a minute, one a second
    whole = tpm.post("/v1/completions", json=text(60))  # 9 + 60 > a whole minute's worth
    assert whole.status_code == 413, whole.text
    assert whole.json()["error"]["code"] == "too_many_tokens"

    first = tpm.post("/v1/completions", json=text(45))  # reserves 54 of 60
    assert first.status_code == 200, first.text
    usage = first.json()["usage"]
    assert usage["completion_tokens"] == 45  # this model never stops early
    # charged what it used (prompt + 45): about 12 tokens left, plus one a second since
    second = tpm.post("/v1/completions", json=text(45))
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "token_rate_limited"
    # the exact wait: 54 needed, 60 - (prompt + 45) + elapsed seconds left
    retry_after = int(second.headers["Retry-After"])
    assert 1 <= retry_after <= usage["prompt_tokens"] + 40


def test_concurrent_generations(
    admin: blindinfer.Client, http: dict[str, httpx.Client], keys: dict[str, str]
) -> None:
    holding = RawRequest(admin, keys["one"], "/v1/chat/completions", chat(LONG, stream=True))
    try:
        assert holding.read_until(b"data: ").startswith(b"HTTP/1.1 200")
        refused = http["one"].post("/v1/completions", json=text(2))  # the N+1th (N = 1)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_generations"
        assert refused.headers["Retry-After"] == "1"
    finally:
        holding.abandon()
    wait_until_idle(http, "one")
    assert http["one"].post("/v1/completions", json=text(2)).status_code == 200


def test_kv_cache_budget(http: dict[str, httpx.Client]) -> None:
    kv = http["kv"]  # 100 000 bytes of KV cache; this model holds 4096 bytes a token
    refused = kv.post("/v1/completions", json=text(30))  # (9 + 30) * 4096 bytes
    assert refused.status_code == 413, refused.text
    body = refused.json()["error"]
    assert body["code"] == "kv_cache_too_large"
    assert "159744 bytes" in body["message"]
    fits = kv.post("/v1/completions", json=text(10))  # (9 + 10) * 4096 = 77 824 bytes
    assert fits.status_code == 200, fits.text
    stats = http["free"].get("/v2/admin/stats").json()
    assert stats["kv_cache_reserved_bytes_by_tenant"].get("kv", 0) == 0  # released


def test_no_prompt_or_answer_in_the_log_or_metrics(
    http: dict[str, httpx.Client], log_file: Path
) -> None:
    answer = http["free"].post("/v1/completions", json=text(24)).json()
    output = answer["choices"][0]["text"]
    assert len(output) > 10
    metrics = http["free"].get("/metrics").text
    log = log_file.read_text()
    for secret in (SECRET, "the river", output):
        assert secret not in log
        assert secret not in metrics
