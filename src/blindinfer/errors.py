"""The one exception family of blindinfer.

    BlindInferError
    ├── AttestationError            the server could not be trusted; nothing was sent
    │   ├── QuoteVerificationError  signature, certificate chain, collateral or TCB
    │   │   ├── QuoteParseError     the evidence bytes are not a well-formed quote
    │   │   ├── DebugEnclaveError   a debug enclave: its memory is open to the host
    │   │   └── SimulationNotAllowedError  simulation evidence without simulation=True
    │   ├── PolicyMismatchError     authentic evidence, but not what the policy expects
    │   ├── KeyBindingError         the evidence does not bind the TLS key we talk to
    │   └── FreshnessError          the evidence does not answer our nonce
    ├── PolicyError                 a policy file or object is malformed
    ├── UsageError                  a wrong argument: bad URL, unknown dtype, unreadable file
    ├── ProtocolError               a message on the wire is malformed (either side)
    │   ├── ModelArchiveError       a model folder archive entry is unsafe or malformed
    │   └── GenaiConfigError        a genai_config.json blindinfer will not run
    ├── ConnectionFailedError       the server could not be reached, or the connection broke
    └── ServerError                 the server answered a request with a structured error

Shared by the client and the server; it imports nothing from either.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


class BlindInferError(Exception):
    """Base of every error blindinfer raises on purpose."""


class AttestationError(BlindInferError):
    """The server's evidence did not verify: the connection is refused."""


class QuoteVerificationError(AttestationError):
    """The quote is not authentic, or its collateral or TCB status cannot be accepted."""


class QuoteParseError(QuoteVerificationError):
    """Evidence bytes that do not parse as the format they claim to be."""


class DebugEnclaveError(QuoteVerificationError):
    """The quote comes from a debug enclave, which never protects data."""


class SimulationNotAllowedError(QuoteVerificationError):
    """Evidence chains to the simulation root but the caller did not ask for simulation."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One policy field that the evidence does not satisfy."""

    field: str
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.field}: expected {self.expected}, got {self.got}"


class PolicyMismatchError(AttestationError):
    """Authentic evidence that the policy does not accept; lists every failing field."""

    def __init__(self, mismatches: list[Mismatch] | tuple[Mismatch, ...]) -> None:
        self.mismatches: tuple[Mismatch, ...] = tuple(mismatches)
        lines = "\n".join(f"  - {m}" for m in self.mismatches)
        super().__init__(f"evidence does not satisfy the policy:\n{lines}")


class KeyBindingError(AttestationError):
    """The evidence's report_data does not bind the certificate seen in the TLS handshake."""


class FreshnessError(AttestationError):
    """The evidence does not carry the nonce this client just sent."""


class PolicyError(BlindInferError):
    """A policy is malformed: unknown field, wrong size, wrong type."""


class UsageError(BlindInferError, ValueError):
    """The caller passed something unusable (an `http://` URL, a directory for a model file,
    an unknown dtype); the message says what to pass instead. Also a ValueError, so code
    that caught ValueError for these keeps working."""


class ProtocolError(BlindInferError):
    """A wire message is malformed; `code` is machine-readable, the message is for humans."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class ConnectionFailedError(BlindInferError):
    """The server could not be reached (refused, unknown host, timeout, broken connection).

    The transport's own exception is kept as `__cause__`; the message says what to check."""


class ServerError(BlindInferError):
    """The server refused a request with a structured error (status, code, message)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"HTTP {status} {code}: {message}")


class SimulationWarning(UserWarning):
    """Emitted whenever a client trusts the simulation root: there is no TEE behind it."""


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it, and so on (cycles cut): transports wrap the useful
    exception (ssl, socket) a few levels down."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
