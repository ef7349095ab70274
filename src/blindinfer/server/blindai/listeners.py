"""Runs the BlindAI-compatible apps on their own ports, next to the native server.

BlindAI's client connects to the run and management ports with the certificate it got
from GET / on the attestation port as its only trust anchor, and checks the host name
`blindai-srv` in it (`assert_hostname`), whatever address it dialled. So the listeners
need a certificate with the DNS name `blindai-srv`: the native identity if it has that
name, otherwise a second in-memory identity made here for the compat ports only (GET /,
the quote and the TLS listeners all name that one, so BlindAI's binding holds).

The attestation port speaks plain HTTP, as BlindAI's did (clients use
`hazmat_http_on_unattested_port=True`, or a TLS-terminating proxy with a public
certificate in front of it). It carries nothing secret: the certificate is public and
the quote proves itself; in simulation BlindAI's client skips the quote anyway.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import uvicorn
from cryptography import x509

from blindinfer.server.blindai.apps import blindai_apps
from blindinfer.server.bodies import CloseUnreadBodies
from blindinfer.server.body_guard import BodyBudget, BodyGuard
from blindinfer.server.connection import abort_unread_bodies
from blindinfer.server.connection_guard import ConnectionGuard, guard_connections
from blindinfer.server.serve import connection_cap, keep_alive_s, listening_socket
from blindinfer.server.state import ServerState
from blindinfer.server.tls import TlsIdentity, make_tls_identity

log = logging.getLogger("blindinfer.server.blindai")

BLINDAI_HOSTNAME = "blindai-srv"
DEFAULT_PORTS = (9923, 9924, 9925)  # attestation (HTTP), run (TLS), management (TLS)
APP_ORDER = ("attestation", "run", "management")


def has_blindai_name(certificate_der: bytes) -> bool:
    certificate = x509.load_der_x509_certificate(certificate_der)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    return BLINDAI_HOSTNAME in names.value.get_values_for_type(x509.DNSName)


def make_blindai_identity() -> TlsIdentity:
    """An in-memory key and self-signed certificate for `blindai-srv` (never stored)."""
    return make_tls_identity(BLINDAI_HOSTNAME)


def blindai_identity(state: ServerState) -> TlsIdentity:
    if has_blindai_name(state.identity.certificate_der):
        return state.identity
    log.info("the native certificate lacks the name %r: BlindAI ports get their own", "blindai-srv")
    return make_blindai_identity()


class BlindAiListeners:
    """Three uvicorn servers on one event loop in a background thread.

    The sockets are bound in the constructor, so a port in use fails at start-up; `ports`
    gives the bound ports (useful with port 0). `start()` serves, `stop()` ends them.
    """

    def __init__(
        self,
        state: ServerState,
        host: str = "127.0.0.1",
        ports: tuple[int, int, int] = DEFAULT_PORTS,
        identity: TlsIdentity | None = None,
        budget: BodyBudget | None = None,
    ) -> None:
        self.identity = identity or blindai_identity(state)
        apps = blindai_apps(state, self.identity)
        self._sockets = [listening_socket(host, port) for port in ports]
        self.ports = tuple(int(s.getsockname()[1]) for s in self._sockets)
        self.servers: list[uvicorn.Server] = []
        limits = state.config.connections
        # the native server's bounds: bodies (slot, budget, deadlines) and connections
        # (count, head deadline and size), one connection guard for the three ports
        self.budget = budget or BodyBudget.from_limits(limits)
        self.guard = ConnectionGuard(limits, connection_cap(state.config))
        for name in APP_ORDER:
            guarded = BodyGuard(
                apps[name],
                limits=limits,
                budget=self.budget,
                quotas=state.quotas,
                authenticator=state.authenticator,
            )
            config = uvicorn.Config(
                CloseUnreadBodies(guarded),
                log_level="warning",
                access_log=False,  # BlindAI requests carry model ids
                server_header=False,  # the apps set BlindAI's Server header
                date_header=False,
                lifespan="off",  # the native app owns the state's lifetime
                http="httptools",
                ws="none",  # no WebSocket routes: no upgrade past the guard
                timeout_keep_alive=keep_alive_s(limits),
            )
            config.load()
            context = None if name == "attestation" else self.identity.ssl_context
            config.http_protocol_class = guard_connections(
                abort_unread_bodies(config.http_protocol_class), self.guard, context
            )
            self.servers.append(uvicorn.Server(config))
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return all(server.started for server in self.servers)

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="blindai-compat", daemon=True)
        self._thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not self.started and waited < timeout_s and self._thread.is_alive():
            deadline.wait(0.01)
            waited += 0.01
        if not self.started:
            self.stop()
            raise RuntimeError("the BlindAI-compatible listeners did not start")

    def _run(self) -> None:
        async def main() -> None:
            pairs = zip(self.servers, self._sockets, strict=True)
            await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in pairs))

        asyncio.run(main())

    def stop(self, timeout_s: float = 10.0) -> None:
        for server in self.servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        for sock in self._sockets:
            sock.close()


def serve_blindai(
    state: ServerState,
    host: str,
    ports: tuple[int, int, int] = DEFAULT_PORTS,
    *,
    budget: BodyBudget | None = None,
) -> BlindAiListeners:
    """Starts the BlindAI-compatible listeners; call `.stop()` when the native server ends.
    `budget`: the native app's, so that the process has one bound on bodies."""
    listeners = BlindAiListeners(state, host, ports, budget=budget)
    listeners.start()
    log.warning(
        "BlindAI Core compatible listeners: attestation http://%s:%d (plain HTTP, as "
        "BlindAI), run https://%s:%d, management https://%s:%d",
        host,
        listeners.ports[0],
        host,
        listeners.ports[1],
        host,
        listeners.ports[2],
    )
    return listeners


def parse_ports(text: str) -> tuple[int, int, int]:
    """`--blindai-ports 9923,9924,9925` (attestation, run, management)."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError("--blindai-ports takes three ports: attestation,run,management")
    a, b, c = (int(p) for p in parts)
    if not all(0 <= p <= 65535 for p in (a, b, c)) or len({a, b, c} - {0}) != len(
        [p for p in (a, b, c) if p]
    ):
        raise ValueError("--blindai-ports must be three distinct ports from 0 to 65535")
    return a, b, c
