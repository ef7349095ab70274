"""Runs the server with uvicorn on the in-memory TLS identity."""

from __future__ import annotations

import logging
import math
import resource
import socket
import threading
from collections.abc import Callable

import uvicorn

from blindinfer.asgi.coalesce import coalesce_writes
from blindinfer.runtime.device import require_attestable, require_device
from blindinfer.server.app import build_state, create_app
from blindinfer.server.body_guard import BodyBudget
from blindinfer.server.config import ConnectionLimits, ServerConfig
from blindinfer.server.connection import abort_unread_bodies
from blindinfer.server.connection_guard import ConnectionGuard, guard_connections
from blindinfer.server.metrics import ServerMetrics
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
    # --device cuda runs on CUDA or not at all (one line, exit 2), before anything starts
    require_device(
        config.device,
        workers=config.limits.workers,
        worker_memory_bytes=config.limits.worker_memory_bytes,
    )
    platform = platform if platform is not None else select_platform(config)
    require_attestable(config.device, platform.kind)
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
        http="httptools",  # connection_guard.py bounds heads through its callbacks
        ws="none",  # no WebSocket routes: no upgrade past the guard
        timeout_keep_alive=keep_alive_s(config.connections),
    )
    uv_config.load()
    # an early refusal must reach a client still sending its body (see connection.py);
    # TLS, connection count, head deadline and head size are connection_guard.py's. The
    # TLS context lives in memory and is used there, so uvicorn itself gets no `ssl`.
    guard = ConnectionGuard(config.connections, connection_cap(config))
    uv_config.http_protocol_class = guard_connections(
        abort_unread_bodies(coalesce_writes(uv_config.http_protocol_class)),
        guard,
        identity.ssl_context,
    )
    return uvicorn.Server(uv_config), state


FD_RESERVE = 256
"""File descriptors kept for everything but client connections (store, workers, logs)."""


def keep_alive_s(limits: ConnectionLimits) -> int:
    """uvicorn's keep-alive timeout is whole seconds."""
    return max(1, math.ceil(limits.keep_alive_s))


def connection_cap(config: ServerConfig) -> int:
    """--max-connections per listener group, lowered to what the process's file
    descriptor limit allows (the BlindAI listeners are a second group)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = config.connections.max_connections
    if soft == resource.RLIM_INFINITY:
        return wanted
    groups = 2 if config.blindai_compat else 1
    allowed = max(16, (soft - FD_RESERVE) // groups)
    if allowed < wanted:
        log.warning(
            "--max-connections %d lowered to %d: the file descriptor limit is %d "
            "(raise it with ulimit -n)",
            wanted,
            allowed,
            soft,
        )
    return min(wanted, allowed)


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
    app_state = getattr(server.config.app, "state", None)
    if config.blindai_compat:
        from blindinfer.server.blindai import serve_blindai

        # one body budget for the process: the BlindAI apps share the native app's
        budget: BodyBudget | None = getattr(app_state, "body_budget", None)
        compat = serve_blindai(state, config.host, config.blindai_ports, budget=budget)
        state.add_listener_stop(compat.stop)
    if config.grpc_port:
        from blindinfer.server.grpc import serve_grpc

        metrics: ServerMetrics | None = getattr(app_state, "metrics", None)
        observe = None if metrics is None else metrics.observe_grpc_call
        listener = serve_grpc(state, config.host, config.grpc_port, observe)
        state.add_listener_stop(listener.stop)
    try:
        server.run(sockets=[sock])
    finally:
        state.stop_listeners()  # when uvicorn ended without its lifespan's shutdown
