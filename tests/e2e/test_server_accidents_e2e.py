"""The server under ordinary accidents, over real TLS sockets to a real server process:

- a client that disconnects mid-upload (or mid-inference request) is counted as a client
  disconnect, not a 5xx; the log has no traceback; nothing of it is stored, on disk or in
  the usage accounting;
- whatever can be refused is refused before the body: the answer arrives while the
  client has sent a sliver of its 87 MiB, and the real client's oversized upload stops
  early with the structured error;
- the server keeps serving afterwards.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

import blindinfer
from blindinfer.client.transport import pinned_context
from blindinfer.server.auth import generate_api_key
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support import onnx_models as zoo

from .conftest import policy_for

pytestmark = pytest.mark.e2e

LIMITS = Limits(max_model_bytes=20_000_000, max_request_bytes=1_000_000)
HUGE = 87 << 20
UPLOAD = "/v2/repository/models/{name}/upload"
INFER = "/v2/models/{ref}/infer"
READ_TIMEOUT_S = 5.0


@dataclass
class Served:
    server: ServerProcess
    keys: dict[str, str]
    context: ssl.SSLContext
    store: Path
    log: IO[str]

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.url.removeprefix("https://").rsplit(":", 1)
        return host.strip("[]"), int(port)

    def http(self, key: str = "admin") -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url,
            verify=self.context,
            headers={"Authorization": f"Bearer {self.keys[key]}"},
        )

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("accidents")
    keys: dict[str, str] = {}
    config = ""
    for tenant, quota, roles in (
        ("ops", "", ("admin",)),
        ("a", "max_models = 4\n", ("owner", "user")),
        ("b", "max_models = 1\n", ("owner",)),
    ):
        config += f'[[tenant]]\nname = "{tenant}"\n{quota}'
        for role in roles:
            key, sha = generate_api_key()
            label = role if tenant in ("ops", "a") else f"{role}_{tenant}"
            keys[label] = key
            config += f'[[tenant.key]]\nid = "{label}"\nrole = "{role}"\nsha256 = "{sha}"\n'
    auth = base / "auth.toml"
    auth.write_text(config)
    store = base / "store"
    args = [
        "--simulation",
        f"--auth-file={auth}",
        f"--store-dir={store}",
        f"--max-model-bytes={LIMITS.max_model_bytes}",
        f"--max-request-bytes={LIMITS.max_request_bytes}",
    ]
    with (base / "server.log").open("w+") as log, start_server(args, stderr=log) as server:
        policy = policy_for(ServerConfig(simulation=True, limits=LIMITS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            with blindinfer.connect(server.url, policy=policy, simulation=True) as client:
                certificate = client.attestation.certificate_der
        yield Served(server, keys, pinned_context(certificate), store, log)


@pytest.fixture(autouse=True)
def clean_log_and_still_serving(served: Served) -> Iterator[None]:
    yield
    with served.http() as http:
        assert http.get("/v2/health/ready").json() == {"ready": True}
        assert http.get("/v2/admin/stats").status_code == 200
    text = served.log_text()
    assert "Traceback" not in text
    assert "ERROR" not in text and "request failed" not in text, text


# ----------------------------------------------------------------- raw HTTP over TLS


def _open(served: Served) -> ssl.SSLSocket:
    sock = socket.create_connection(served.address, timeout=READ_TIMEOUT_S)
    return served.context.wrap_socket(sock, server_hostname="blindinfer")


def _head(method: str, path: str, length: int, key: str | None) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: blindinfer",
        f"Content-Length: {length}",
        "Content-Type: application/octet-stream",
    ]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    document: dict[str, str]
    seconds: float


def _read_answer(tls: ssl.SSLSocket, started: float) -> Answer:
    """One HTTP response, read within READ_TIMEOUT_S (socket.timeout otherwise)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, f"the server closed without answering: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers["content-length"]):
        chunk = tls.recv(65536)
        assert chunk, "the server closed mid-answer"
        body += chunk
    return Answer(
        int(status_line.split()[1]), headers, json.loads(body), time.monotonic() - started
    )


def _refused_at_once(
    served: Served, method: str, path: str, key: str | None, *, length: int = HUGE
) -> Answer:
    """Sends the headers of a `length`-byte body and 4 KiB of it, then waits for the
    answer: it must come although the body is nowhere near complete."""
    started = time.monotonic()
    with _open(served) as tls:
        tls.sendall(_head(method, path, length, key) + bytes(4096))
        answer = _read_answer(tls, started)
    assert set(answer.document) == {"error", "code"}
    assert answer.seconds < READ_TIMEOUT_S
    return answer


def _metrics(served: Served) -> str:
    with served.http() as http:
        reply = http.get("/metrics")
        assert reply.status_code == 200
        return reply.text


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _server_errors(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith("blindinfer_http_requests_total{") and 'status="5' in line
    ]


def _await_disconnects(served: Served, route: str, method: str, expected: float) -> str:
    """The server learns of a disconnect when its loop gets to it: poll a few seconds."""
    deadline = time.monotonic() + 10
    while True:
        text = _metrics(served)
        seen = _sample(text, "blindinfer_client_disconnects_total", route=route, method=method)
        if seen >= expected or time.monotonic() > deadline:
            assert seen == expected, text
            return text
        time.sleep(0.05)


def _store_files(served: Served) -> set[str]:
    return {str(p.relative_to(served.store)) for p in served.store.rglob("*") if p.is_file()}


def _usage(served: Served) -> tuple[int, int]:
    with served.http() as http:
        stats = http.get("/v2/admin/stats").json()
    return stats["models"], stats["stored_bytes"]


# ----------------------------------------------------------------- disconnects


@pytest.mark.parametrize("abrupt", [False, True], ids=["closed", "reset"])
def test_a_client_gone_mid_upload_leaves_nothing_and_is_no_server_error(
    served: Served, abrupt: bool
) -> None:
    with served.http("owner") as owner:
        assert owner.put("/v2/repository/models/kept/upload", content=_mlp()).status_code in (
            200,
            201,
        )
    before_usage, before_files = _usage(served), _store_files(served)
    counted = _sample(_metrics(served), "blindinfer_client_disconnects_total", route=UPLOAD)
    with _open(served) as tls:
        path = "/v2/repository/models/interrupted/upload"
        tls.sendall(_head("PUT", path, 8 << 20, served.keys["owner"]))
        tls.sendall(bytes(1 << 20))
        if abrupt:  # RST instead of FIN
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    text = _await_disconnects(served, UPLOAD, "PUT", counted + 1)
    assert _server_errors(text) == []
    assert _sample(text, "blindinfer_http_requests_total", route=UPLOAD, status="499") >= 1
    assert "interrupted" not in text
    assert _usage(served) == before_usage
    assert _store_files(served) == before_files
    assert not [f for f in before_files if ".tmp-" in f]
    with served.http("owner") as owner:
        assert owner.get("/v2/models/interrupted").json()["code"] == "unknown_model"
        names = [m["name"] for m in owner.post("/v2/repository/index").json()]
        assert "interrupted" not in names and "kept" in names


def test_a_client_gone_mid_inference_request_is_counted_as_such(served: Served) -> None:
    with served.http("owner") as owner:
        assert owner.put("/v2/repository/models/kept/upload", content=_mlp()).status_code in (
            200,
            201,
        )
    counted = _sample(_metrics(served), "blindinfer_client_disconnects_total", route=INFER)
    with _open(served) as tls:
        tls.sendall(_head("POST", "/v2/models/kept/infer", 500_000, served.keys["user"]))
        tls.sendall(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [')
    text = _await_disconnects(served, INFER, "POST", counted + 1)
    assert _server_errors(text) == []


# ----------------------------------------------------------------- early refusals


def test_too_large_is_said_before_the_body(served: Served) -> None:
    answer = _refused_at_once(
        served, "PUT", "/v2/repository/models/big/upload", served.keys["owner"]
    )
    assert (answer.status, answer.document["code"]) == (413, "payload_too_large")
    assert answer.document["error"] == (
        f"the model is {HUGE} bytes (87.0 MiB); the limit is {LIMITS.max_model_bytes} bytes "
        "(19.1 MiB, --max-model-bytes)"
    )
    assert answer.headers["connection"] == "close"


def test_an_invalid_name_is_said_before_the_body(served: Served) -> None:
    answer = _refused_at_once(
        served, "PUT", "/v2/repository/models/my%20model/upload", served.keys["owner"]
    )
    assert (answer.status, answer.document["code"]) == (400, "invalid_model_name")
    assert answer.document["error"].startswith(
        "'my model' is not a valid model name: a name has 1 to 128 characters, each a letter "
        "(A-Z, a-z), a digit, '_', '.' or '-', and starts with a letter or digit"
    )


def test_keys_and_roles_are_checked_before_the_body(served: Served) -> None:
    path = "/v2/repository/models/m/upload"
    missing = _refused_at_once(served, "PUT", path, None)
    assert (missing.status, missing.document["code"]) == (401, "unauthorized")
    assert missing.headers["www-authenticate"] == 'Bearer realm="blindinfer"'
    unknown = _refused_at_once(served, "PUT", path, generate_api_key()[0])
    assert (unknown.status, unknown.document["code"]) == (401, "unauthorized")
    user = _refused_at_once(served, "PUT", path, served.keys["user"])
    assert (user.status, user.document["code"]) == (403, "forbidden")
    assert user.document["error"] == "the 'user' role may not upload or replace models"


def test_an_exhausted_quota_is_said_before_the_body(served: Served) -> None:
    with served.http("owner_b") as owner_b:
        first = owner_b.put("/v2/repository/models/only/upload", content=_mlp())
        assert first.status_code in (200, 201), first.text
    answer = _refused_at_once(
        served,
        "PUT",
        "/v2/repository/models/second/upload",
        served.keys["owner_b"],
        length=10_000_000,
    )
    assert (answer.status, answer.document["code"]) == (403, "quota_exceeded")
    assert answer.document["error"] == (
        "tenant 'b' has 1 models and may store at most 1; delete one before uploading another"
    )


def test_an_inference_request_over_the_limit_is_refused_before_its_body(
    served: Served,
) -> None:
    with served.http("owner") as owner:
        assert owner.put("/v2/repository/models/kept/upload", content=_mlp()).status_code in (
            200,
            201,
        )
    answer = _refused_at_once(served, "POST", "/v2/models/kept/infer", served.keys["user"])
    assert (answer.status, answer.document["code"]) == (413, "payload_too_large")
    assert answer.document["error"] == (
        f"the request body is {HUGE} bytes (87.0 MiB); the limit is "
        f"{LIMITS.max_request_bytes} bytes (976.6 KiB, --max-request-bytes)"
    )


def test_the_client_hears_too_large_long_before_its_upload_is_sent(served: Served) -> None:
    sent: list[int] = []
    policy = policy_for(ServerConfig(simulation=True, limits=LIMITS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        client = blindinfer.connect(
            served.server.url, policy=policy, simulation=True, api_key=served.keys["owner"]
        )
    with client, pytest.raises(blindinfer.ServerError) as caught:
        client.upload_model(bytes(HUGE), name="too-big", progress=lambda n, _: sent.append(n))
    assert (caught.value.status, caught.value.code) == (413, "payload_too_large")
    assert f"the limit is {LIMITS.max_model_bytes} bytes" in caught.value.message
    # the socket buffers took some megabytes at most, never the 87 MiB
    assert max(sent) < HUGE // 2, max(sent)
    with served.http("owner") as owner:
        assert owner.get("/v2/models/too-big").json()["code"] == "unknown_model"


def _mlp() -> bytes:
    return zoo.model_bytes(zoo.mlp_model())


def test_a_stopping_server_does_not_wait_for_idle_keep_alive_clients() -> None:
    """SIGTERM with a client's pooled connection idle: the server closes it and exits. The
    TLS close used to wait for that client's close_notify, which a pool never sends, for
    --header-timeout-s (here 120 s: far beyond the bound below)."""
    with (
        start_server(["--simulation", "--header-timeout-s", "120"]) as server,
        httpx.Client(base_url=server.url, verify=False) as idle,
    ):
        assert idle.get("/v2/health/live").status_code == 200
        server.process.terminate()
        # uvicorn re-raises the signal it handled once its graceful shutdown is done
        assert server.process.wait(timeout=60) == -signal.SIGTERM
        with pytest.raises(httpx.TransportError):  # its connection was closed, not left
            idle.get("/v2/health/live")
