"""The inference request's fast path: h11 on pinned TLS sockets, without httpx per request.

Why: at batch 1 the client's own work was ~0.6 ms of a ~1.5 ms request, mostly httpx
building a request (headers, URL merging, an auth flow, a stream) and httpcore reading the
answer through several layers in 64 KiB chunks (docs/performance.md, "Client fast path").
This pool only moves the bytes of a fully built request (`Call` with a bytes body) and
hands back an `httpx.Response`, so that everything around it stays shared with the httpx
path: `send_with_retries`, `request_errors`, `infer_outputs`, `server_error`.

- Trust is exactly the Client's: each socket is wrapped with the same pinned
  `ssl.SSLContext` (`transport.pinned_context`), the handshake completes before a byte of
  the request is written, so a certificate other than the attested one never sees one.
  A replica-set client (`gate`) instead passes each new socket through
  `replica_gate.KeyGate.check` right after its handshake; the answer then carries the
  connection's AttestedKey in `extensions[replica_gate.ATTESTED_KEY]` (for receipts). An
  idle connection whose key was forgotten or grew too old since is closed, not reused.
- One write per request: the head (h11 formats it from a cached, pre-validated
  `h11.Request`) and a small body leave in one `sendall`, i.e. one TLS record.
- The answer: h11 parses the head; a Content-Length body goes with `recv_into` straight
  into one buffer of that size, refused over `max_body` before anything is allocated; a
  chunked or close-delimited body is read through h11's events under the same bound.
  h11 cannot be told that a body was read around it, so each exchange gets its own
  (cheap) `h11.Connection`; the socket stays open for the next one.
- Failures leave as the httpx exceptions httpcore would raise in the same phase
  (ConnectError/ConnectTimeout, WriteTimeout, ReadError/ReadTimeout, RemoteProtocolError,
  PoolTimeout), each chaining the socket's exception, so `request_errors` turns them into
  the same blindinfer errors (KeyBindingError for a refused certificate).
- Keep-alive: an idle connection is dropped when it has been idle `KEEPALIVE_EXPIRY`
  seconds or its socket became readable (the server closed it, or sent bytes it should
  not have): httpcore's rule. That check cannot see a close that races with the request
  (the server's keep-alive timeout fires as the request is on its way), so a request on
  a REUSED connection that ended before any byte of the answer is sent once more, once,
  on a fresh connection. Only inference requests take this path, and running a model
  again gives the same outputs (`blindinfer.client.retry`). A connection that broke after
  a byte of the answer came, or a fresh one that broke, is never retried.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar, cast
from urllib.parse import urlsplit

import h11
import httpx

from blindinfer.client.attested_keys import AttestedKey
from blindinfer.client.replica_gate import ATTESTED_KEY, KeyGate, peer_certificate
from blindinfer.errors import ProtocolError

K = TypeVar("K")
V = TypeVar("V")

KEEPALIVE_EXPIRY = 5.0
"""Seconds an idle connection is kept (httpx's default, well under the server's 30 s)."""
ONE_WRITE_BYTES = 64 * 1024
"""Bodies up to this size leave in the same `sendall` as the head (client/coalesce.py)."""
RECV_BYTES = 64 * 1024
"""The read buffer for the head (and what comes with it) and for h11-framed bodies."""
_CACHED = 64
"""Request heads and httpx.Request objects kept per pool (per model and input size)."""


@dataclass(slots=True)
class _Connection:
    sock: ssl.SSLSocket
    buffer: bytearray = field(default_factory=lambda: bytearray(RECV_BYTES))
    idle_since: float = 0.0
    reused: bool = False
    key: AttestedKey | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a broken socket: nothing more to do
            self.sock.close()

    def stale(self, now: float) -> bool:
        """Expired, or readable while idle (closed by the server, or unexpected bytes)."""
        if now - self.idle_since > KEEPALIVE_EXPIRY or self.sock.pending():
            return True
        try:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


class _ClosedBeforeAnswer(Exception):
    """A reused connection closed before a byte of the answer: safe to send once more."""

    def __init__(self, cause: httpx.TransportError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reusable: bool


class PinnedConnectionPool:
    """Keep-alive connections to one attested server, for requests with a bytes body.

    Thread-safe: a connection serves one request at a time; idle ones wait in a stack
    (the most recently used first, so that few stay warm). At most `max_connections` are
    open at once (a request waits `timeout` for one, then fails as httpx's PoolTimeout);
    `max_keepalive` of them are kept when idle.
    """

    def __init__(
        self,
        url: str,
        context: ssl.SSLContext,
        *,
        timeout: float,
        headers: Sequence[tuple[str, str]],
        max_body: int,
        max_connections: int = 100,
        max_keepalive: int = 20,
        gate: KeyGate | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"no host in {url!r}")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._prefix = parts.path.rstrip("/")
        self._host_header = httpx.URL(url).netloc.decode("ascii")
        self._context = context
        self._gate = gate
        self._timeout = timeout
        self._headers = tuple((name, value) for name, value in headers if name.lower() != "host")
        self._max_body = max_body
        self._max_keepalive = max_keepalive
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._heads: dict[tuple[str, str, tuple[tuple[str, str], ...], int], h11.Request] = {}
        self._requests: dict[tuple[str, str], httpx.Request] = {}
        self._closed = False

    # -- the request ------------------------------------------------------------------------

    def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> httpx.Response:
        """Sends one request and returns its whole answer (status, headers, body).

        Raises httpx's exceptions for transport failures (see the module docstring) and
        ProtocolError("too_large") for an answer over `max_body`.
        """
        target = self._prefix + path
        event = self._head(method, target, headers, len(body))
        if not self._slots.acquire(timeout=self._timeout):
            raise httpx.PoolTimeout("timed out waiting for a free connection")
        try:
            answer, key = self._send(event, method, body)
        finally:
            self._slots.release()
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            content=answer.body,
            request=self._request(method, target),
            extensions={ATTESTED_KEY: key} if key is not None else None,
        )

    def close(self) -> None:
        """Closes every idle connection; those in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _send(
        self, event: h11.Request, method: str, body: bytes
    ) -> tuple[_Answer, AttestedKey | None]:
        connection = self._checkout()
        try:
            answer = self._exchange(connection, event, method, body)
        except _ClosedBeforeAnswer:
            connection.close()
            connection = self._connect()  # once, on a fresh connection
            try:  # a fresh connection never raises _ClosedBeforeAnswer
                answer = self._exchange(connection, event, method, body)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise
        if answer.reusable:
            self._checkin(connection)
        else:
            connection.close()
        return answer, connection.key

    # -- the pool ---------------------------------------------------------------------------

    def _checkout(self) -> _Connection:
        now = time.monotonic()
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("Cannot send a request, as the client has been closed.")
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                return self._connect()
            if connection.stale(now) or not self._still_trusted(connection):
                connection.close()
                continue
            connection.reused = True
            return connection

    def _still_trusted(self, connection: _Connection) -> bool:
        """A replica-set connection is reused only while its key is still trusted (not
        forgotten, not too old): else a new connection, which attests that key again if it
        presents it."""
        key = connection.key
        return key is None or self._gate is None or self._gate.current(key)

    def _checkin(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        with self._lock:
            if not self._closed and len(self._idle) < self._max_keepalive:
                self._idle.append(connection)
                return
        connection.close()

    def _connect(self) -> _Connection:
        """A TCP connection, TCP_NODELAY, and a completed pinned handshake."""
        try:
            raw = socket.create_connection((self._host, self._port), timeout=self._timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(self._timeout)
            sock = self._context.wrap_socket(raw, server_hostname=self._host)
        except TimeoutError as exc:
            raw.close()
            raise httpx.ConnectTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raw.close()
            raise httpx.ConnectError(str(exc)) from exc
        if self._gate is None:
            return _Connection(sock)
        try:
            key = self._gate.check(
                peer_certificate(sock), sock.sendall, lambda: sock.recv(RECV_BYTES)
            )
        except TimeoutError as exc:
            _close(sock)
            raise httpx.ConnectTimeout(str(exc) or "timed out") from exc
        except OSError as exc:  # the peer closed or reset it during the check
            _close(sock)
            raise httpx.ConnectError(str(exc)) from exc
        except BaseException:
            _close(sock)
            raise
        return _Connection(sock, key=key)

    # -- one exchange -----------------------------------------------------------------------

    def _exchange(
        self, connection: _Connection, event: h11.Request, method: str, body: bytes
    ) -> _Answer:
        exchange = h11.Connection(h11.CLIENT)
        head = exchange.send(event)
        assert head is not None
        write_error: OSError | None = None
        try:
            if len(body) <= ONE_WRITE_BYTES:
                connection.sock.sendall(head + body)
            else:
                connection.sock.sendall(head)
                connection.sock.sendall(body)
        except TimeoutError as exc:
            raise httpx.WriteTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            # as httpcore: the server may have answered before it stopped reading
            write_error = exc
        reader = _Reader(connection, exchange, self._max_body, method, write_error)
        return reader.answer()

    # -- caches -----------------------------------------------------------------------------

    def _head(self, method: str, target: str, headers: dict[str, str], length: int) -> h11.Request:
        key = (method, target, tuple(headers.items()), length)
        event = self._heads.get(key)
        if event is None:
            fields = [
                ("Host", self._host_header),
                *self._headers,
                *headers.items(),
                ("Content-Length", str(length)),
            ]
            try:
                event = h11.Request(method=method, target=target, headers=fields)
            except h11.LocalProtocolError as exc:  # e.g. a line break in the API key
                raise httpx.LocalProtocolError(str(exc)) from exc
            _remember(self._heads, key, event)
        return event

    def _request(self, method: str, target: str) -> httpx.Request:
        """The answer's `request` (retry logs and error messages read its method and path)."""
        key = (method, target)
        request = self._requests.get(key)
        if request is None:
            request = httpx.Request(method, self._origin + target)
            _remember(self._requests, key, request)
        return request


def _close(sock: ssl.SSLSocket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _remember(cache: dict[K, V], key: K, value: V) -> None:
    """Bounded: many model names would otherwise grow the cache without end."""
    if len(cache) >= _CACHED:
        cache.clear()
    cache[key] = value


class _Reader:
    """Reads one answer from `connection` (see the module docstring)."""

    def __init__(
        self,
        connection: _Connection,
        exchange: h11.Connection,
        max_body: int,
        method: str,
        write_error: OSError | None,
    ) -> None:
        self._connection = connection
        self._exchange = exchange
        self._max_body = max_body
        self._method = method
        self._write_error = write_error
        self._view = memoryview(connection.buffer)
        self._received = 0

    def answer(self) -> _Answer:
        response = self._response()
        length = _content_length(response.headers)
        bodiless = self._method == "HEAD" or response.status_code in (204, 304)
        if length is not None and not bodiless and not _chunked(response.headers):
            body, clean = self._sized_body(length)
        else:
            body, clean = self._framed_body()
        reusable = (
            clean
            and response.http_version == b"1.1"
            and not _closes(response.headers)
            and not self._connection.sock.pending()
        )
        return _Answer(response.status_code, list(response.headers), body, reusable)

    def _response(self) -> h11.Response:
        while True:
            event = self._next()
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                self._fail(httpx.RemoteProtocolError(f"unexpected {type(event).__name__}"))

    def _sized_body(self, length: int) -> tuple[bytes, bool]:
        """The body straight into one buffer; True if nothing followed it."""
        self._bound(length)
        body = bytearray(length)
        view = memoryview(body)
        filled = 0
        while filled < length:  # what h11 read along with the head
            event = self._next(read=False)
            if not isinstance(event, h11.Data):
                break
            view[filled : filled + len(event.data)] = event.data
            filled += len(event.data)
        while filled < length:
            count = self._recv(view[filled:])
            if count == 0:
                self._fail(
                    httpx.RemoteProtocolError(
                        "peer closed connection without sending complete message body "
                        f"(received {filled} bytes, expected {length})"
                    )
                )
            filled += count
        trailing, _ = self._exchange.trailing_data
        return bytes(body), not trailing

    def _framed_body(self) -> tuple[bytes, bool]:
        """A chunked or close-delimited body through h11's events, bounded."""
        body = bytearray()
        while True:
            event = self._next()
            if isinstance(event, h11.Data):
                body += event.data
                self._bound(len(body))
            elif isinstance(event, h11.EndOfMessage):
                trailing, closed = self._exchange.trailing_data
                return bytes(body), not trailing and not closed
            else:
                self._fail(httpx.RemoteProtocolError(f"unexpected {type(event).__name__}"))

    def _bound(self, size: int) -> None:
        if size > self._max_body:
            raise ProtocolError(
                "too_large",
                f"the server's answer ({size} bytes) is larger than the client's limit of "
                f"{self._max_body} bytes",
            )

    def _next(self, *, read: bool = True) -> h11.Event | type[h11.NEED_DATA]:
        """h11's next event, reading from the socket when it needs data (if `read`)."""
        while True:
            try:
                event = self._exchange.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(httpx.RemoteProtocolError(str(exc)), exc)
            if event is h11.PAUSED:  # h11 pauses only after a whole answer was read
                self._fail(httpx.RemoteProtocolError("unexpected bytes after the answer"))
            if event is not h11.NEED_DATA or not read:
                return cast("h11.Event | type[h11.NEED_DATA]", event)
            count = self._recv(self._view)
            if count == 0 and not self._received:
                self._fail_before_answer(
                    httpx.RemoteProtocolError("Server disconnected without sending a response.")
                )
            self._received += count
            self._exchange.receive_data(bytes(self._view[:count]))

    def _recv(self, into: memoryview) -> int:
        try:
            return self._connection.sock.recv_into(into)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            error = httpx.ReadError(str(exc))
            if not self._received:
                self._fail_before_answer(error, exc)
            raise error from exc

    def _fail_before_answer(
        self, error: httpx.TransportError, cause: BaseException | None = None
    ) -> NoReturn:
        error.__cause__ = cause or self._write_error
        if self._connection.reused:
            raise _ClosedBeforeAnswer(error)
        raise error

    def _fail(self, error: httpx.TransportError, cause: BaseException | None = None) -> NoReturn:
        raise error from cause


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """h11 has checked that a Content-Length is one string of digits."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


def _chunked(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(name == b"transfer-encoding" for name, _ in headers)


def _closes(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(
        name == b"connection" and b"close" in (t.strip().lower() for t in value.split(b","))
        for name, value in headers
    )
