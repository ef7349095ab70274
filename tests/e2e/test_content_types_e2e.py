"""The server refuses a request body whose Content-Type its route does not read (415).

The attack: a web page can make a browser send a cross-origin POST without a CORS
preflight only with a text/plain, form or multipart body. Each is sent here to every route
of a real server process (and of the BlindAI Core listeners) and must be refused with 415
`unsupported_media_type` and change nothing, while blindinfer's own client (octet-stream
uploads, binary inference, JSON) and clients that send no Content-Type (tritonclient,
BlindAI's) keep working.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

import blindinfer
from blindinfer.client.transport import pinned_context
from blindinfer.server.app import build_state, close_state
from blindinfer.server.blindai import BlindAiListeners
from blindinfer.server.config import ServerConfig
from blindinfer.server.platforms import select_platform
from blindinfer.server.process import ServerProcess
from blindinfer.server.tls import make_tls_identity
from support import onnx_models as zoo

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::blindinfer.SimulationWarning")]

MODEL = zoo.model_bytes(zoo.multi_io_model())
SIMPLE_REQUEST_TYPES = (
    "text/plain",
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
)


@pytest.fixture(scope="module")
def client(server: ServerProcess, policy: blindinfer.Policy) -> Iterator[blindinfer.Client]:
    with blindinfer.connect(server.url, policy=policy, simulation=True) as connected:
        yield connected


@pytest.fixture(scope="module")
def raw(server: ServerProcess, policy: blindinfer.Policy) -> Iterator[httpx.Client]:
    """Plain HTTP requests on a connection pinned to the attested certificate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        verified = blindinfer.attest(server.url, policy=policy, simulation=True)
    context = pinned_context(verified.certificate_der)
    with httpx.Client(base_url=server.url, verify=context, timeout=30) as http:
        yield http


def test_simple_request_types_are_refused_on_every_route(
    client: blindinfer.Client, raw: httpx.Client
) -> None:
    client.upload_model(MODEL, name="ct-private")
    infer = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    ).encode()
    attempts = [
        ("POST", "/v2/repository/models/ct-private/share", b'{"tenants": ["*"]}'),
        ("POST", "/v2/repository/models/ct-private/unload", b"{}"),
        ("DELETE", "/v2/repository/models/ct-private", b""),
        ("PUT", "/v2/repository/models/ct-planted/upload", MODEL),
        ("POST", "/v2/repository/models/ct-planted/upload", MODEL),
        ("POST", "/v2/repository/models/ct-planted/load", b"{}"),
        ("POST", "/v2/models/ct-private/infer", infer),
        ("POST", "/v2/models/ct-private/versions/1/infer", infer),
        ("POST", "/v2/repository/index", b""),
        ("POST", "/v2/attestation", b'{"nonce": "00"}'),
    ]
    for content_type in SIMPLE_REQUEST_TYPES:
        for method, path, body in attempts:
            response = raw.request(
                method, path, content=body, headers={"content-type": content_type}
            )
            assert response.status_code == 415, (content_type, method, path, response.text)
            document = response.json()
            assert document["code"] == "unsupported_media_type"
            assert content_type.split(";")[0] in document["error"]
    # nothing happened: still there, still private, nothing planted
    models = {m.name: m for m in client.list_models()}
    assert "ct-planted" not in models
    assert models["ct-private"].shared_with == ()
    client.delete_model("ct-private")


def test_a_json_body_is_refused_as_a_model_and_octet_stream_as_json(raw: httpx.Client) -> None:
    upload = raw.put(
        "/v2/repository/models/ct-json/upload",
        content=MODEL,
        headers={"content-type": "application/json"},
    )
    assert upload.status_code == 415
    assert "application/octet-stream" in upload.json()["error"]
    share = raw.post(
        "/v2/repository/models/ct-json/share",
        content=b'{"tenants": ["*"]}',
        headers={"content-type": "application/octet-stream"},
    )
    assert share.status_code == 415


def test_the_real_clients_still_work(client: blindinfer.Client, raw: httpx.Client) -> None:
    """blindinfer's client (octet-stream upload, binary inference, JSON share) and a
    client without any Content-Type (what tritonclient sends), parameters and case."""
    info = client.upload_model(MODEL, name="ct-ok")
    feed = zoo.multi_io_feed(batch=2)
    outputs = client.run_model("ct-ok", feed)
    assert set(outputs) == {"logits", "ids_float", "masked_ids", "mask_count"}
    assert client.share_model("ct-ok", ["*"]).shared_with == ("*",)
    bare = raw.post("/v2/repository/index", content=b"")
    assert bare.status_code == 200
    assert "content-type" not in bare.request.headers
    cased = raw.post(
        "/v2/repository/models/ct-ok/share",
        content=b'{"tenants": []}',
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )
    assert cased.status_code == 200, cased.text
    assert client.delete_model(info.model_id).name == "ct-ok"
    assert np.asarray(outputs["logits"]).shape[0] == 2


@pytest.fixture(scope="module")
def blindai() -> Iterator[BlindAiListeners]:
    config = ServerConfig(simulation=True)
    state = build_state(config, select_platform(config), make_tls_identity())
    running = BlindAiListeners(state, "127.0.0.1", (0, 0, 0))
    running.start()
    try:
        yield running
    finally:
        running.stop()
        close_state(state)


def test_blindai_listeners_refuse_simple_request_types(blindai: BlindAiListeners) -> None:
    """BlindAI's client sends CBOR without a Content-Type (tests/e2e/test_blindai_compat_e2e.py
    runs it); a text/plain or form body is refused in the listeners' own error format."""
    _, run_port, management_port = blindai.ports
    context = pinned_context(blindai.identity.certificate_der)
    with httpx.Client(verify=context, timeout=30) as http:
        for port, path in (
            (management_port, "/upload"),
            (management_port, "/delete"),
            (run_port, "/run"),
        ):
            for content_type in SIMPLE_REQUEST_TYPES:
                response = http.post(
                    f"https://127.0.0.1:{port}{path}",
                    content=b"\xa0",
                    headers={"content-type": content_type},
                )
                assert response.status_code == 415, (path, content_type)
                assert response.headers["x-blindinfer-error-code"] == "unsupported_media_type"
                assert response.headers["content-type"] == "application/cbor"
            accepted = http.post(
                f"https://127.0.0.1:{port}{path}",
                content=b"\xa0",  # an empty CBOR map: reaches the route, which refuses it
                headers={"content-type": "application/cbor"},
            )
            assert accepted.status_code != 415
