"""Attesting the key of a connection that is already open, before any request goes on it.

When a new connection to a replica set presents a key the client has not attested (see
`attested_keys.py`), the client asks for evidence on THAT connection: a fresh nonce in a
`POST /v2/attestation`, the evidence read back, then verified against the certificate this
handshake presented. Asking on another connection would prove nothing about this one (the
balancer may route it to another replica).

`EvidenceExchange` is the HTTP/1.1 part, without I/O (h11), so that the synchronous client,
the asynchronous client and the proxy drive the same bytes over their own sockets. The
exchange consumes exactly one response and leaves the connection idle and reusable.
`BootEvidenceExchange` is its `GET /v2/attestation` twin: the replica's boot evidence, which
its receipts name, read on the same connection so that it is that replica's.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import h11

from blindinfer.attestation.bundle import EvidenceBundle
from blindinfer.errors import ProtocolError
from blindinfer.protocol.evidence import (
    MAX_EVIDENCE_BYTES,
    NONCE_SIZE,
    encode_nonce_request,
    parse_evidence_document,
)

_MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class EvidenceRequest:
    """The bytes to write, and the nonce they carry."""

    data: bytes
    nonce: bytes


class _EvidenceAnswer:
    """One request to the attestation route and its answer, parsed with h11 and bounded."""

    def __init__(self, method: str, host: str, body: bytes | None) -> None:
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_BYTES)
        headers = [("host", host)]
        if body is not None:
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        head = h11.Request(method=method, target="/v2/attestation", headers=headers)
        data = self._h11.send(head) or b""
        if body is not None:
            data += self._h11.send(h11.Data(data=body)) or b""
        data += self._h11.send(h11.EndOfMessage()) or b""
        self.data = data
        self._status: int | None = None
        self._body = bytearray()

    def receive(self, data: bytes) -> bytes | None:
        """Feeds bytes read from the connection (b"" at end of stream); returns the
        evidence body once the whole response is in, None while more is needed."""
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if data == b"":
                    raise ProtocolError(
                        "bad_answer", "the server closed the connection before its evidence"
                    ) from exc
                raise ProtocolError("bad_answer", f"unreadable evidence answer: {exc}") from exc
            if event is h11.NEED_DATA:
                if data == b"":
                    raise ProtocolError(
                        "bad_answer", "the server closed the connection before its evidence"
                    )
                return None
            if isinstance(event, h11.Response):
                self._status = event.status_code
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_EVIDENCE_BYTES:
                    raise ProtocolError("too_large", "the server's evidence is too large")
            elif isinstance(event, h11.EndOfMessage):
                return self._finish()
            elif isinstance(event, h11.ConnectionClosed):
                raise ProtocolError(
                    "bad_answer", "the server closed the connection before its evidence"
                )

    def _finish(self) -> bytes:
        if self._status != 200:
            raise ProtocolError(
                "no_evidence", f"the server answered HTTP {self._status} for evidence"
            )
        return bytes(self._body)

    @property
    def reusable(self) -> bool:
        """Whether the connection may carry requests after this exchange (no close asked,
        and nothing sent beyond the answer)."""
        return (
            self._h11.our_state is h11.DONE
            and self._h11.their_state is h11.DONE
            and not self._h11.trailing_data[0]
        )


class EvidenceExchange(_EvidenceAnswer):
    """One `POST /v2/attestation` with a fresh nonce over an open connection."""

    def __init__(self, source: str, host: str, nonce: bytes | None = None) -> None:
        self._source = source
        self._nonce = secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce
        super().__init__("POST", host, encode_nonce_request(self._nonce))
        self.request = EvidenceRequest(self.data, self._nonce)

    def bundle(self, body: bytes, certificate_der: bytes) -> EvidenceBundle:
        """The evidence as a bundle bound to this connection's certificate and nonce."""
        return EvidenceBundle(
            source=self._source,
            captured_at=int(time.time()),
            nonce=self._nonce,
            tls_certificate_der=certificate_der,
            evidence=parse_evidence_document(body),
        )


class BootEvidenceExchange(_EvidenceAnswer):
    """One `GET /v2/attestation` (the boot evidence receipts name) over an open connection."""

    def __init__(self, host: str) -> None:
        super().__init__("GET", host, None)
