"""Why the proxy forwards nothing: the answer for an upstream that could not be attested.

Its own module so that both of the proxy's sides (HTTP in proxy/forward.py, gRPC in
proxy/grpc_forward.py) raise and translate the same exception without importing each other.
"""

from __future__ import annotations

import httpx

from blindinfer.errors import ConnectionFailedError


class NotAttested(Exception):
    """No valid attestation: carries the reason, as a status and a JSON document."""

    def __init__(self, status: int, document: dict[str, object]) -> None:
        super().__init__(str(document.get("error")))
        self.status = status
        self.document = document


def refusal(exc: BaseException, upstream: str) -> NotAttested:
    """The 502/503 answer for an attestation that failed with `exc`."""
    if isinstance(exc, NotAttested):
        return exc
    unreachable = isinstance(exc, ConnectionFailedError | httpx.TransportError | OSError)
    status = 503 if unreachable else 502
    code = "upstream_unavailable" if unreachable else "attestation_failed"
    kind = type(exc).__name__
    message = str(exc) or kind
    return NotAttested(
        status,
        {
            "error": (
                f"the upstream {upstream} could not be attested, nothing was forwarded: "
                f"{kind}: {message}"
            ),
            "code": code,
            "attestation_error": kind,
            "message": message,
            "upstream": upstream,
        },
    )


__all__ = ["NotAttested", "refusal"]
