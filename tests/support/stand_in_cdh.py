"""A loopback HTTP server standing in for the Confidential Data Hub's REST API.

The CDH (confidential-containers/guest-components, api-server-rest) is an external
service that releases KBS resources to an attested pod; no TEE, KBS or CDH runs here, so
the tests talk to this stand-in instead, over real HTTP on loopback. It answers as
api-server-rest/src/router.rs does: ``GET /cdh/resource/<repository>/<type>/<tag>`` is
200 ``application/octet-stream`` with the resource's raw bytes; a resource the "KBS"
does not release is 500 with the CDH's error text; any other path is 404 ``URL NOT
FOUND``. `Answer` scripts the misbehaviours (delays, oversized, chunked, slow bodies).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

RESOURCE_PREFIX = "/cdh/resource/"


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the status line
    drip_s: float = 0.0  # between body bytes
    chunked: bool = False  # no Content-Length: the size shows only while reading


class StandInCdh:
    """`resources`: resource path (``repo/type/tag``) -> its bytes, or a scripted `Answer`.
    `requests` lists (method, path) of every request received."""

    def __init__(self, resources: Mapping[str, bytes | Answer]) -> None:
        self.resources = dict(resources)
        self.requests: list[tuple[str, str]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                stand_in.requests.append(("GET", self.path))
                stand_in._answer(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path
        if not path.startswith(RESOURCE_PREFIX):
            answer = Answer(404, b"URL NOT FOUND")
        else:
            found = self.resources.get(path[len(RESOURCE_PREFIX) :])
            if found is None:
                text = f"Failed to get resource: offline-fs-kbc: resource not found {path}"
                answer = Answer(500, text.encode())
            elif isinstance(found, bytes):
                answer = Answer(200, found, {"Content-Type": "application/octet-stream"})
            else:
                answer = found
        time.sleep(answer.delay_s)
        handler.send_response(answer.status)
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        handler.send_header("Connection", "close")
        if answer.chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Content-Length", str(len(answer.body)))
        handler.end_headers()
        try:
            if answer.chunked:
                for start in range(0, len(answer.body), 1024):
                    piece = answer.body[start : start + 1024]
                    handler.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                handler.wfile.write(b"0\r\n\r\n")
            elif answer.drip_s:
                for byte in answer.body:
                    handler.wfile.write(bytes([byte]))
                    handler.wfile.flush()
                    time.sleep(answer.drip_s)
            else:
                handler.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading, as it should past its bound

    def __enter__(self) -> StandInCdh:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
