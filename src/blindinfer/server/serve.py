"""Runs the server with uvicorn on the in-memory TLS identity."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import uvicorn

from blindinfer.server.app import build_state, create_app
from blindinfer.server.config import ServerConfig
from blindinfer.server.connection import abort_unread_bodies
from blindinfer.server.platforms import select_platform
from blindinfer.server.state import ServerState
from blindinfer.server.tls import make_tls_identity
from blindinfer.tee.platform import Platform

log = logging.getLogger("blindinfer.server")


def build_server(config: ServerConfig, platform: Platform | None = None) -> uvicorn.Server:
    """A uvicorn server for `config`; `platform` defaults to the one `config` selects."""
    return build_server_and_state(config, platform)[0]


def build_server_and_state(
    config: ServerConfig, platform: Platform | None = None
) -> tuple[uvicorn.Server, ServerState]:
    platform = platform if platform is not None else select_platform(config)
    identity = make_tls_identity()
    state = build_state(config, platform, identity)
    app = create_app(state)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        access_log=False,  # paths carry model names; keep logs free of user data
        server_header=False,
        date_header=False,
        timeout_keep_alive=30,
    )
    uv_config.load()
    # an early refusal must reach a client still sending its body (see connection.py)
    uv_config.http_protocol_class = abort_unread_bodies(uv_config.http_protocol_class)
    # uvicorn only knows key files; ours lives in memory, so hand it the context directly.
    uv_config.ssl = identity.ssl_context
    return uvicorn.Server(uv_config), state


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this. Without it, a response whose headers and body go out
    # as separate TLS records waits for a delayed ACK: +40 ms per request on loopback.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def serve(config: ServerConfig, on_ready: Callable[[int], None] | None = None) -> None:
    """Serves until interrupted; `on_ready(port)` runs once the socket listens."""
    server, state = build_server_and_state(config)
    sock = listening_socket(config.host, config.port)
    port = int(sock.getsockname()[1])
    if on_ready is not None:

        def notify() -> None:
            while not server.started:
                threading.Event().wait(0.01)
            on_ready(port)

        threading.Thread(target=notify, daemon=True).start()
    compat = None
    if config.blindai_compat:
        from blindinfer.server.blindai import serve_blindai

        compat = serve_blindai(state, config.host, config.blindai_ports)
    try:
        server.run(sockets=[sock])
    finally:
        if compat is not None:
            compat.stop()
