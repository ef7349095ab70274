"""A man in the middle for the negative end-to-end tests.

It terminates TLS with ITS OWN freshly made certificate and forwards every request to the
real server. Modes: "relay" (forwards faithfully), "tamper_quote" (flips one byte of the
quote in evidence responses), "replay" (answers every attestation request with the first
evidence it saw, i.e. evidence for a stale nonce). It records every path it was asked for,
so a test can prove that no data request ever reached it.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from blindinfer.server.tls import make_tls_identity


@dataclass
class Mitm:
    upstream: str
    mode: str = "relay"
    url: str = ""
    seen: list[str] = field(default_factory=list)
    first_evidence: bytes | None = None

    def transform(self, path: str, body: bytes) -> bytes:
        if path != "/v2/attestation":
            return body
        if self.mode == "replay":
            if self.first_evidence is None:
                self.first_evidence = body
            return self.first_evidence
        if self.mode == "tamper_quote":
            document = json.loads(body)
            quote = bytearray(base64.b64decode(document["quote"]))
            quote[48 + 64] ^= 0x01  # first byte of MRENCLAVE
            document["quote"] = base64.b64encode(bytes(quote)).decode()
            return json.dumps(document).encode()
        return body


def start_mitm(mitm: Mitm) -> uvicorn.Server:
    upstream = httpx.Client(base_url=mitm.upstream, verify=False, timeout=30)

    async def forward(request: Request) -> Response:
        mitm.seen.append(request.url.path)
        reply = upstream.request(
            request.method,
            request.url.path,
            content=await request.body(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
        )
        body = mitm.transform(request.url.path, reply.content)
        headers = {
            k: v
            for k, v in reply.headers.items()
            if k.lower() not in {"content-length", "transfer-encoding", "connection"}
        }
        return Response(body, status_code=reply.status_code, headers=headers)

    app = Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE"])]
    )
    identity = make_tls_identity()
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    config.load()
    config.ssl = identity.ssl_context
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    mitm.url = f"https://127.0.0.1:{port}"
    return server
