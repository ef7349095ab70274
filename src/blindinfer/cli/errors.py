"""What the `blindinfer` command prints when something goes wrong, and its exit status.

One table for every command (docs/cli.md):

    0    ok
    1    evidence refused: not authentic, key binding, freshness, simulation not allowed,
         debug enclave (AttestationError except PolicyMismatchError); also a receipt or an
         audit log that does not verify, and unexpected errors
    2    usage: a bad flag or value, a missing or unreadable file, a bad URL, a malformed
         policy (UsageError, PolicyError), a port in use, no TEE without --simulation
    3    policy mismatch: authentic evidence the policy does not accept (PolicyMismatchError)
    4    server error or unreachable (ConnectionFailedError, ServerError, ProtocolError, and
         the transport's own errors while the client does not wrap them all yet)
    130  interrupted (Ctrl-C)

Each failure is one or two lines on stderr: what went wrong, then what to do. `--debug` or
BLINDINFER_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import TextIO

from blindinfer.errors import (
    AttestationError,
    BlindInferError,
    ConnectionFailedError,
    PolicyError,
    PolicyMismatchError,
    ProtocolError,
    ServerError,
    SimulationNotAllowedError,
    SimulationWarning,
    UsageError,
    causes,
)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_POLICY = 3
EXIT_SERVER = 4
EXIT_INTERRUPTED = 130

DEBUG_ENV = "BLINDINFER_DEBUG"
BANNER = (
    "WARNING: SIMULATION MODE: the server is not in a TEE, nothing sent to it is protected "
    "(testing only, never real data)"
)
SIMULATION_REFUSAL = (
    "{target} is a SIMULATION server (no TEE: its operator can read everything sent to it)"
)
SIMULATION_HINT = "pass --simulation to accept it anyway, for testing only"
DEBUG_HINT = "run again with --debug (or BLINDINFER_DEBUG=1) to see the traceback"


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: str) -> str:
    """A library message on one line (policy mismatches come one field per line)."""
    return "; ".join(part.strip(" -") for part in str(text).splitlines() if part.strip(" -"))


def refusal_reason(exc: BaseException, target: str = "the server") -> str:
    """The reason printed for refused evidence, in CLI terms (`--simulation`, not the
    Python `simulation=True` the library's message names)."""
    if isinstance(exc, SimulationNotAllowedError):
        reason = SIMULATION_REFUSAL.format(target=target) + "; " + SIMULATION_HINT
        return f"{type(exc).__name__}: {reason}"
    if isinstance(exc, PolicyMismatchError):
        return "authentic, but the policy is not satisfied: " + one_line(
            "; ".join(str(m) for m in exc.mismatches)
        )
    return f"{type(exc).__name__}: {one_line(str(exc))}"


def _is_transport(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionFailedError | ssl.SSLError | ConnectionError | socket.gaierror):
        return True
    if isinstance(exc, TimeoutError):
        return True
    module = type(exc).__module__.split(".")[0]
    if module in ("httpx", "httpcore"):
        try:
            import httpx
        except ImportError:  # pragma: no cover - httpx is a client dependency
            return False
        return isinstance(exc, httpx.TransportError)
    return False


def _unreachable(exc: BaseException, target: str) -> list[str]:
    """Why `target` could not be reached, from the whole exception chain."""
    for link in causes(exc):
        if isinstance(link, ConnectionRefusedError):
            return [
                f"cannot reach {target}: connection refused",
                "is the server running? check the host and port (blindinfer serve listens on "
                "9924 unless --port says otherwise)",
            ]
        if isinstance(link, socket.gaierror):
            return [
                f"cannot reach {target}: unknown host",
                "check the host name in the URL (https://host:port)",
            ]
        if isinstance(link, ssl.SSLError):
            return [
                f"cannot reach {target}: TLS handshake failed ({link.reason or link})",
                "is a blindinfer server listening on that port? check the URL",
            ]
        if isinstance(link, TimeoutError) or type(link).__name__.endswith("Timeout"):
            return [
                f"cannot reach {target}: timed out",
                "check the host, the port and any firewall in between",
            ]
    for link in causes(exc):
        if type(link).__name__ in ("ReadError", "RemoteProtocolError", "WriteError"):
            return [
                f"the connection to {target} broke: {one_line(str(link)) or type(link).__name__}",
                "is a blindinfer server listening on that port? check the URL",
            ]
    text = one_line(str(exc)) or type(exc).__name__
    return [f"cannot reach {target}: {text}", "check the URL, and that the server is running"]


def _server_hint(exc: ServerError) -> str | None:
    if exc.status in (401, 403):
        return "pass the tenant's key with --api-key or BLINDINFER_API_KEY"
    if exc.status == 404:
        return "`blindinfer models` lists the models this key can see"
    if exc.status == 413:
        return "the server's limits are set by its operator (serve --max-request-bytes ...)"
    return None


def explain(exc: BaseException, *, target: str | None = None) -> tuple[int, list[str]]:
    """(exit status, message lines) for an exception that ended a command."""
    where = target or "the server"
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, ["interrupted"]
    if isinstance(exc, SimulationNotAllowedError):
        return EXIT_REFUSED, [
            "refused: " + SIMULATION_REFUSAL.format(target=where),
            SIMULATION_HINT,
        ]
    if isinstance(exc, PolicyMismatchError):
        return EXIT_POLICY, [
            "the evidence is authentic but does not satisfy the policy: "
            + "; ".join(str(m) for m in exc.mismatches),
            "if the server was rebuilt or reconfigured, measure it again and update the policy",
        ]
    if isinstance(exc, AttestationError):
        return EXIT_REFUSED, [f"evidence refused: {type(exc).__name__}: {one_line(str(exc))}"]
    if isinstance(exc, PolicyError):
        return EXIT_USAGE, [f"unusable policy: {one_line(str(exc))}"]
    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc).splitlines()[:2]
    if _is_transport(exc):
        return EXIT_SERVER, _unreachable(exc, where)
    if isinstance(exc, ServerError):
        hint = _server_hint(exc)
        lines = [f"{where} refused the request: {one_line(str(exc))}"]
        return EXIT_SERVER, lines + ([hint] if hint else [])
    if isinstance(exc, ProtocolError):
        return EXIT_SERVER, [
            f"unexpected answer from {where}: {one_line(str(exc))}",
            "is a blindinfer server listening there? check the URL",
        ]
    if isinstance(exc, BlindInferError):
        return EXIT_REFUSED, [f"{type(exc).__name__}: {one_line(str(exc))}"]
    if isinstance(exc, OSError):
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES) and not (
            exc.filename
        ):
            return EXIT_USAGE, [f"cannot listen: {exc.strerror or exc}"]
        if exc.filename is not None:
            return EXIT_USAGE, [f"cannot use {exc.filename}: {exc.strerror or exc}"]
        return EXIT_REFUSED, [f"{type(exc).__name__}: {exc}", DEBUG_HINT]
    if isinstance(exc, ValueError):
        return EXIT_USAGE, [one_line(str(exc)) or type(exc).__name__]
    return EXIT_REFUSED, [
        f"unexpected error: {type(exc).__name__}: {one_line(str(exc))}",
        DEBUG_HINT,
    ]


def report(
    exc: BaseException,
    *,
    prog: str,
    target: str | None = None,
    debug: bool = False,
    stream: TextIO | None = None,
) -> int:
    """Prints the failure (and, with `debug`, the traceback first); returns the exit status."""
    out = stream if stream is not None else sys.stderr
    if debug:
        traceback.print_exception(exc, file=out)
    code, lines = explain(exc, target=target)
    first, *rest = lines
    print(f"{prog}: {first}", file=out)
    for line in rest[:1]:
        print(line, file=out)
    out.flush()
    return code


@contextlib.contextmanager
def simulation_banner(stream: TextIO | None = None) -> Iterator[None]:
    """Inside it, the library's SimulationWarning prints BANNER once, as one line, instead
    of Python's `file:line: SimulationWarning: ...` (every time); other warnings print as
    they would."""
    shown = False
    with warnings.catch_warnings():
        warnings.simplefilter("always", SimulationWarning)
        previous = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            nonlocal shown
            if not issubclass(category, SimulationWarning):
                previous(message, category, filename, lineno, file, line)
                return
            if not shown:
                shown = True
                out = stream if stream is not None else sys.stderr
                print(BANNER, file=out, flush=True)

        warnings.showwarning = show
        yield
