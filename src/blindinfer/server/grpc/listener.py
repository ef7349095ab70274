"""The gRPC listener: grpc.aio on its own thread and event loop, TLS with the attested key.

Like the BlindAI listeners (server/blindai/listeners.py), it shares the process's
ServerState and its thread pools, and runs on a loop of its own so that nothing it does
can hold uvicorn's loop. The TLS key and certificate are the native server's, the ones
the attestation evidence binds, handed to grpc as in-memory PEM: a client that pins the
attested certificate (docs/grpc.md) knows it talks to the attested server.

Bounds: grpc reads a whole message before the handler runs, so the message size limit is
the request limit (a load too: larger models go over REST's streaming upload), and the
servicer checks each call's own limit; at most `max_concurrent_calls` run at once, as many
as fit the body buffer budget (more are refused RESOURCE_EXHAUSTED by grpc); metadata is
bounded like HTTP heads; idle connections close after the keep-alive time. TLS version:
grpcio's Python API sets no minimum, so grpc's defaults apply (TLS 1.2 with ECDHE-AES-GCM
suites, or 1.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import Future
from typing import Final

import grpc

from blindinfer.server.grpc.servicer import Observe, OipServicer
from blindinfer.server.state import ServerState
from blindinfer.server.tls import TlsIdentity

log = logging.getLogger("blindinfer.server.grpc")

SEND_MARGIN_BYTES: Final = 1 << 20
"""Response bytes beyond the outputs' own (names, shapes, framing)."""
STOP_GRACE_S: Final = 2.0


def server_credentials(identity: TlsIdentity) -> grpc.ServerCredentials:
    """TLS credentials with the attested key pair; no client certificates."""
    key_pem, certificate_pem = identity.pem_key_and_certificate()
    return grpc.ssl_server_credentials([(key_pem, certificate_pem)])


def max_message_bytes(servicer: OipServicer) -> int:
    return max(servicer.max_infer_bytes, servicer.max_load_bytes)


def max_concurrent_calls(state: ServerState, servicer: OipServicer) -> int:
    """Calls at once, so that the messages grpc holds stay within the body buffer budget
    REST has (--max-body-buffer-bytes): the memory exhaustion by mass uploads that
    BlindAI's audit found stays closed on this port too."""
    connections = state.config.connections
    fitting = connections.max_body_buffer_bytes // max_message_bytes(servicer)
    return max(1, min(connections.max_concurrent_bodies, fitting))


def server_options(state: ServerState, servicer: OipServicer) -> list[tuple[str, int]]:
    limits = state.config.limits
    connections = state.config.connections
    return [
        ("grpc.max_receive_message_length", max_message_bytes(servicer)),
        ("grpc.max_send_message_length", limits.max_response_bytes + SEND_MARGIN_BYTES),
        ("grpc.max_metadata_size", connections.max_header_bytes),
        ("grpc.max_connection_idle_ms", int(connections.keep_alive_s * 1000)),
        # grpc sets SO_REUSEPORT by default: a second server on the port would then start
        # and silently take a share of the connections
        ("grpc.so_reuseport", 0),
    ]


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcListener:
    """One grpc.aio server on a background thread; `start()` binds and serves (raising if
    the port cannot be bound), `stop()` ends it. `port` is the bound port."""

    def __init__(
        self, state: ServerState, host: str, port: int, observe: Observe | None = None
    ) -> None:
        self.state = state
        self.observe = observe
        self.host = host
        self.requested_port = port
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        ready: Future[int] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="blindinfer-grpc", daemon=True
        )
        self._thread.start()
        try:
            self.port = ready.result(timeout_s)
        except Exception:
            self.stop()
            raise

    def _run(self, ready: Future[int]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
        finally:
            loop.close()

    async def _serve(self, ready: Future[int]) -> None:
        servicer = OipServicer(self.state, self.observe)
        server = grpc.aio.server(
            options=server_options(self.state, servicer),
            maximum_concurrent_rpcs=max_concurrent_calls(self.state, servicer),
        )
        server.add_generic_rpc_handlers((servicer.handlers(),))
        target = _target(self.host, self.requested_port)
        try:
            port = server.add_secure_port(target, server_credentials(self.state.identity))
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(f"cannot listen for gRPC on {target}")
        self._stopped = asyncio.Event()
        self._server = server
        await server.start()
        ready.set_result(port)
        try:
            await self._stopped.wait()
            await server.stop(STOP_GRACE_S)
        finally:
            servicer.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stopped.set)
        if self._thread is not None:
            self._thread.join(timeout_s)


def serve_grpc(
    state: ServerState, host: str, port: int, observe: Observe | None = None
) -> GrpcListener:
    """Starts the gRPC listener; call `.stop()` when the native server ends. `observe`
    records each call (the native app's ServerMetrics.observe_grpc_call)."""
    listener = GrpcListener(state, host, port, observe)
    listener.start()
    log.warning("OIP v2 gRPC on %s (TLS with the attested key)", _target(host, listener.port))
    return listener
