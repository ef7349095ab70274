"""Outputs are bounded and encoded off the event loop (issue 21, item 2), on real servers.

The attack: a 97-byte model (`Expand` of a scalar to a shape given as input) and a
78-byte request ask for 64 M FP32 elements. Before the fix the server received the 256 MiB
output from its worker, encoded it as JSON on the event loop (14 s during which
`/v2/health/live` did not answer) and grew to 3.7 GiB; a 3 GiB output would have had the
kernel kill it. Now the worker sizes the outputs and refuses them with 422
`response_too_large` before a byte reaches the server, on every path that runs models:
OIP JSON, OIP binary and BlindAI's `/run`. Large responses that are allowed are encoded on
a thread, so health checks keep answering while one is encoded.

Real server processes (`blindinfer serve`), real workers, real TLS; the server's own
resident memory (not its workers', where the output legitimately exists for a moment) is
read from /proc.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import cbor2
import httpx
import numpy as np
import pytest

import blindinfer
from blindinfer.client.transport import pinned_context
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support import hostile_models, procmem

from .conftest import policy_for

pytestmark = pytest.mark.e2e
MiB = 1 << 20
ATTACK = 64 << 20  # elements: 256 MiB as FP32, ~256 MiB as JSON
LIMIT = Limits().max_response_bytes  # the default is what is under attack


@dataclass
class Served:
    server: ServerProcess
    client: blindinfer.Client
    raw: httpx.Client
    context: Any
    blindai_run: str | None
    blindai_context: Any


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [int(sock.getsockname()[1]) for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _serve(stack: ExitStack, limits: Limits, *args: str, blindai: bool = False) -> Served:
    extra = list(args)
    ports: list[int] = []
    if blindai:
        ports = _free_ports(3)
        extra += ["--blindai-compat", "--blindai-ports", ",".join(map(str, ports))]
    server = stack.enter_context(start_server(["--simulation", *extra]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        client = blindinfer.connect(
            server.url,
            policy=policy_for(ServerConfig(simulation=True, limits=limits)),
            simulation=True,
        )
    stack.enter_context(client)
    context = pinned_context(client.attestation.certificate_der)
    raw = stack.enter_context(httpx.Client(base_url=server.url, verify=context, timeout=120))
    client.upload_model(hostile_models.expand_output_model(), name="expand")
    blindai_run, blindai_context = None, None
    if blindai:
        certificate = cbor2.loads(httpx.get(f"http://127.0.0.1:{ports[0]}/").content)
        blindai_run = f"https://127.0.0.1:{ports[1]}/run"
        blindai_context = pinned_context(certificate)
    served = Served(server, client, raw, context, blindai_run, blindai_context)
    _run_json(served, 1000)  # warm: the model is loaded, the code paths imported
    return served


@pytest.fixture(scope="module")
def default_server() -> Iterator[Served]:
    with ExitStack() as stack:
        yield _serve(stack, Limits(), blindai=True)


def _json_request(n: int) -> dict[str, Any]:
    return {"inputs": [{"name": "shape", "datatype": "INT64", "shape": [1], "data": [n]}]}


def _run_json(served: Served, n: int) -> httpx.Response:
    return served.raw.post("/v2/models/expand/infer", json=_json_request(n))


def _peak(served: Served) -> int:
    return procmem.peak_rss_bytes(served.server.process.pid)


def _assert_still_serving(served: Served) -> None:
    assert served.raw.get("/v2/health/live").json() == {"live": True}
    reply = _run_json(served, 1000)
    assert reply.status_code == 200
    (output,) = reply.json()["outputs"]
    assert output["shape"] == [1000] and output["data"] == [1.0] * 1000
    y = served.client.run_model("expand", {"shape": np.array([12345], np.int64)})["y"]
    assert y.shape == (12345,) and bool((y == 1).all())


def test_the_attack_request_and_model_are_under_100_bytes() -> None:
    body = json.dumps(_json_request(ATTACK), separators=(",", ":")).encode()
    assert len(body) < 100 and len(hostile_models.expand_output_model()) < 100


def test_json_output_of_64m_elements_is_refused_before_it_reaches_the_server(
    default_server: Served,
) -> None:
    before = _peak(default_server)
    started = time.monotonic()
    reply = _run_json(default_server, ATTACK)
    assert reply.status_code == 422, reply.text[:300]
    document = reply.json()
    assert document["code"] == "response_too_large"
    message = document["error"]
    assert f"the limit is {LIMIT} bytes (64.0 MiB, --max-response-bytes)" in message
    assert f"as JSON ({ATTACK * 4} bytes (256.0 MiB) of tensor data)" in message
    assert "ask for the outputs as binary data" in message
    assert time.monotonic() - started < 30  # the hole: 14 s of JSON encoding, then 256 MiB
    # the hole made the server alone grow by gigabytes; the output never came near it
    assert _peak(default_server) - before < 64 * MiB
    _assert_still_serving(default_server)


def test_binary_output_of_64m_elements_is_refused(default_server: Served) -> None:
    before = _peak(default_server)
    with pytest.raises(blindinfer.ServerError) as refused:
        default_server.client.run_model("expand", {"shape": np.array([ATTACK], np.int64)})
    assert (refused.value.status, refused.value.code) == (422, "response_too_large")
    assert "(256.0 MiB); the limit is" in refused.value.message
    assert "--max-response-bytes" in refused.value.message
    assert _peak(default_server) - before < 64 * MiB
    _assert_still_serving(default_server)


def test_blindai_run_of_64m_elements_is_refused(default_server: Served) -> None:
    assert default_server.blindai_run is not None
    record = default_server.client.list_models()
    (sha256,) = [m.sha256 for m in record if m.name == "expand"]
    request: dict[str, Any] = {
        "model_hash": sha256,
        "inputs": [
            {
                "info": {"fact": [1], "datum_type": 3, "node_name": "shape"},  # 3: I64
                "bytes_data": np.array([ATTACK], "<i8").tobytes(),
            }
        ],
    }
    before = _peak(default_server)
    with httpx.Client(verify=default_server.blindai_context, timeout=120) as blindai:
        reply = blindai.post(
            default_server.blindai_run,
            content=cbor2.dumps(request),
            headers={"Content-Type": "application/cbor"},
        )
        assert reply.status_code == 422
        assert reply.headers["X-Blindinfer-Error-Code"] == "response_too_large"
        assert "--max-response-bytes" in cbor2.loads(reply.content)
        assert _peak(default_server) - before < 64 * MiB
        request["inputs"][0]["bytes_data"] = np.array([1000], "<i8").tobytes()
        ok = blindai.post(
            default_server.blindai_run,
            content=cbor2.dumps(request),
            headers={"Content-Type": "application/cbor"},
        )
        assert ok.status_code == 200
        (output,) = cbor2.loads(ok.content)["outputs"]
        assert output["info"]["fact"] == [1000]
        assert output["bytes_data"] == np.ones(1000, "<f4").tobytes()
    _assert_still_serving(default_server)


BIG_LIMITS = Limits(max_response_bytes=1 << 30)
BIG_JSON = 16 << 20  # elements: 64 MiB of JSON ("1.0,"), within a 1 GiB limit


@pytest.mark.slow
def test_a_large_json_response_is_encoded_off_the_event_loop() -> None:
    """16 M elements as JSON took 3-4 s of encoding on the event loop; now on a thread,
    in pieces, while /v2/health/live keeps answering."""
    with ExitStack() as stack:
        served = _serve(stack, BIG_LIMITS, f"--max-response-bytes={BIG_LIMITS.max_response_bytes}")
        done = threading.Event()
        answer: list[httpx.Response] = []

        def attack() -> None:
            try:
                with httpx.Client(
                    base_url=served.server.url, verify=served.context, timeout=300
                ) as other:
                    request = _json_request(BIG_JSON)
                    answer.append(other.post("/v2/models/expand/infer", json=request))
            finally:
                done.set()

        worst = 0.0
        probes = 0
        thread = threading.Thread(target=attack)
        started = time.monotonic()
        thread.start()
        while not done.is_set():
            probe = time.monotonic()
            assert served.raw.get("/v2/health/live").status_code == 200
            worst = max(worst, time.monotonic() - probe)
            probes += 1
            time.sleep(0.02)
        thread.join()
        took = time.monotonic() - started
        (reply,) = answer
        assert reply.status_code == 200
        assert len(reply.content) > BIG_JSON * 4
        (output,) = json.loads(reply.content)["outputs"]
        assert output["shape"] == [BIG_JSON] and len(output["data"]) == BIG_JSON
        # generous on a loaded machine; on the event loop it was the whole encoding
        assert worst < 1.5, f"health took {worst:.2f} s during a {took:.1f} s response"
        assert probes >= 5
        _assert_still_serving(served)
