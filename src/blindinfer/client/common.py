"""What `Client` and `AsyncClient` share, so that only the sending differs between them.

- `Call`: one API request as data (method, path, body); built by the `*_call` functions, sent
  by either client, rebuilt into a fresh `httpx.Request` for every attempt.
- `Upload`: a model's bytes, streamed in chunks from memory or from its file with an exact
  Content-Length (the server refuses an oversized model before reading it), re-readable for
  retries, reporting progress as chunks are handed to the connection.
- `server_error`, `infer_outputs`: reading answers; `retry_delay`: the retry policy applied
  to an answer (policy and rationale in `blindinfer.client.retry`).
- `http_options`: the pinned TLS transport, pool, timeout and API key of the httpx client.
- `request_errors`, `json_answer`, `policy_of`: every failure as a blindinfer error (a
  connection failure, an unreadable model file, a malformed answer, a bad policy argument).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import stat
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from blindinfer.attestation.policy import Policy, load_policy
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.client.coalesce import coalescing_transport
from blindinfer.client.model_folder import ModelFolder
from blindinfer.client.models import ModelInfo
from blindinfer.client.replica_gate import KeyGate, gated_async_transport, gated_context
from blindinfer.client.retry import RetryPolicy
from blindinfer.client.transport import NO_DELAY, connection_failed, pinned_context
from blindinfer.errors import BlindInferError, ProtocolError, ServerError, UsageError, causes
from blindinfer.protocol.content_types import TAR
from blindinfer.protocol.inference import (
    InferResponse,
    encode_infer_request,
    parse_header_length,
    parse_infer_response,
)
from blindinfer.protocol.limits import TensorLimits
from blindinfer.protocol.model_archive import CONFIG_NAME

log = logging.getLogger("blindinfer.client")
T = TypeVar("T")
UPLOAD_CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]
"""`progress(bytes_sent, total_bytes)`; total is None when unknown (never, for uploads)."""


class ModelFileError(OSError):
    """The model file could not be read while it was uploaded (gone, changed, unreadable);
    the client raises it as a UsageError naming the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path = path
        self.reason = reason


def model_file(model: str | Path) -> tuple[Path, int]:
    """The path and size of a model file; UsageError naming it unless it is a readable file."""
    path = Path(model)
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise UsageError(f"model file {str(path)!r} does not exist") from exc
    except OSError as exc:
        raise UsageError(f"cannot read the model file {str(path)!r}: {_why(exc)}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(
            f"{str(path)!r} is a directory without genai_config.json: upload_model takes an "
            "ONNX model file, its bytes, an onnx.ModelProto, or an onnxruntime-genai model folder"
        )
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{str(path)!r} is not a regular file: pass an ONNX model file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot read the model file {str(path)!r}: {_why(exc)}") from exc
    return path, info.st_size


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


@dataclass(frozen=True, slots=True)
class Upload:
    """A model to upload: its bytes in memory, or its file (read lazily, chunk by chunk).

    Every call of `chunks()` / `achunks()` streams the model from the start and reports
    `progress(0, size)` then `progress(sent, size)` after each chunk the connection took, so
    the counts increase and end at `size`; a retried upload reports from 0 again.
    """

    size: int
    data: bytes | None = None
    path: Path | None = None
    progress: Progress | None = None
    folder: ModelFolder | None = None
    """A generative model folder, streamed as its archive (application/x-tar)."""

    @property
    def content_type(self) -> str:
        return TAR if self.folder is not None else "application/octet-stream"

    @classmethod
    def of(cls, model: object, progress: Progress | None = None) -> Upload:
        if isinstance(model, str | os.PathLike) and (Path(model) / CONFIG_NAME).is_file():
            folder = ModelFolder.open(model)
            return cls(folder.size, folder=folder, progress=progress)
        if isinstance(model, bytes | bytearray | memoryview):
            data = bytes(model)
            return cls(len(data), data=data, progress=progress)
        if isinstance(model, str | os.PathLike):
            path, size = model_file(os.fspath(model))
            return cls(size, path=path, progress=progress)
        serialize = getattr(model, "SerializeToString", None)
        if callable(serialize):
            data = bytes(serialize())
            return cls(len(data), data=data, progress=progress)
        raise UsageError(
            f"cannot upload a {type(model).__name__}: pass a path, bytes, or an onnx.ModelProto"
        )

    def chunks(self) -> Iterator[bytes]:
        report = self._reporter()
        for chunk in self._read():
            yield chunk
            report(len(chunk))

    async def achunks(self) -> AsyncIterator[bytes]:
        """The same chunks for httpx.AsyncClient; file reads run in a worker thread, the
        progress callback on the event loop."""
        report = self._reporter()
        pieces = self._read()
        try:
            while True:
                if self.path is None:
                    chunk = next(pieces, None)
                else:
                    chunk = await asyncio.to_thread(next, pieces, None)
                if chunk is None:
                    return
                yield chunk
                report(len(chunk))
        finally:
            pieces.close()

    def _reporter(self) -> Callable[[int], None]:
        progress, size, sent = self.progress, self.size, [0]
        if progress is None:
            return lambda count: None

        def report(count: int) -> None:
            sent[0] += count
            progress(sent[0], size)

        progress(0, size)
        return report

    def _read(self) -> Generator[bytes, None, None]:
        if self.folder is not None:
            yield from self.folder.chunks(UPLOAD_CHUNK)
            return
        if self.data is not None:
            for start in range(0, self.size, UPLOAD_CHUNK):
                yield self.data[start : start + UPLOAD_CHUNK]
            return
        assert self.path is not None
        try:
            handle = self.path.open("rb")
        except OSError as exc:
            raise ModelFileError(self.path, f"cannot be read: {_why(exc)}") from exc
        with handle:
            left = self.size
            while left:
                try:
                    chunk = handle.read(min(UPLOAD_CHUNK, left))
                except OSError as exc:
                    raise ModelFileError(self.path, f"cannot be read: {_why(exc)}") from exc
                if not chunk:
                    raise ModelFileError(self.path, "shrank while it was being uploaded")
                left -= len(chunk)
                yield chunk
            if handle.read(1):
                raise ModelFileError(self.path, "grew while it was being uploaded")


@dataclass(frozen=True, slots=True)
class Call:
    """One API request, independent of how it is sent."""

    method: str
    path: str
    params: dict[str, str] | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    upload: Upload | None = None
    idempotent: bool = False
    """Sending it twice is the same as once (inference, metadata, listing): sent again on
    a new connection when its connection broke (`send_retrying_broken`)."""


def _quoted(model: str) -> str:
    return quote(model, safe="")


def upload_call(
    model: object,
    name: str | None,
    share_with: Sequence[str],
    progress: Progress | None,
    receipt: bool = False,
) -> Call:
    upload = Upload.of(model, progress)
    params = {"share": ",".join(share_with)} if share_with else {}
    if receipt:
        params["receipt"] = "1"
    return Call(
        "PUT",
        f"/v2/repository/models/{_quoted(name) if name else '_'}/upload",
        params=params or None,
        headers={
            "content-type": upload.content_type,
            "Content-Length": str(upload.size),
        },
        upload=upload,
    )


def delete_call(model: str, receipt: bool = False) -> Call:
    params = {"receipt": "1"} if receipt else None
    return Call("DELETE", f"/v2/repository/models/{_quoted(model)}", params=params)


def share_call(model: str, tenants: Sequence[str]) -> Call:
    return Call(
        "POST", f"/v2/repository/models/{_quoted(model)}/share", json={"tenants": list(tenants)}
    )


INDEX_CALL = Call("POST", "/v2/repository/index", idempotent=True)


def metadata_call(model: str) -> Call:
    return Call("GET", f"/v2/models/{_quoted(model)}", idempotent=True)


def needs_input_names(inputs: object) -> bool:
    """A bare tensor (not a dict by input name) needs the model's one input name."""
    return not (isinstance(inputs, dict) and not {"data", "dtype", "shape"} <= inputs.keys())


def infer_call(
    model: str,
    arrays: dict[str, np.ndarray],
    outputs: Sequence[str] | None,
    receipt: bool = False,
) -> Call:
    body, headers = encode_infer_request(arrays, outputs=outputs, binary=True, receipt=receipt)
    return Call(
        "POST",
        f"/v2/models/{_quoted(model)}/infer",
        content=body,
        headers=headers,
        idempotent=True,
    )


def infer_outputs(response: httpx.Response, limits: TensorLimits) -> dict[str, np.ndarray]:
    return dict(infer_response(response, limits).outputs)


def infer_response(response: httpx.Response, limits: TensorLimits) -> InferResponse:
    header_length = parse_header_length(response.headers.get("inference-header-content-length"))
    return parse_infer_response(response.content, header_length, limits)


def build_request(
    http: httpx.Client | httpx.AsyncClient, call: Call, *, asynchronous: bool
) -> httpx.Request:
    """A fresh request for one attempt (an upload streams from the start again)."""
    content: bytes | Iterator[bytes] | AsyncIterator[bytes] | None = call.content
    if call.upload is not None:
        content = call.upload.achunks() if asynchronous else call.upload.chunks()
    return http.build_request(
        call.method,
        call.path,
        params=call.params,
        json=call.json,
        content=content,
        headers=call.headers,
    )


@contextmanager
def request_errors(url: str, timeout: float, call: Call) -> Iterator[None]:
    """Raises the failures of sending `call` on the pinned connection as blindinfer errors:
    the transport's as ConnectionFailedError (KeyBindingError if another key answers), an
    unreadable model file as UsageError; each keeps the original as `__cause__`."""
    try:
        yield
    except ModelFileError as exc:
        raise UsageError(f"cannot upload the model file {str(exc.path)!r}: {exc.reason}") from exc
    except httpx.RequestError as exc:
        request = f"{call.method} {call.path}"
        raise connection_failed(exc, url, timeout, request=request, pinned=True) from exc


BROKEN_RETRIES = 2
"""How many times a request is sent again on a new connection after its connection broke."""
_BROKEN_BACKOFF = 0.05


def broken_retryable(call: Call, exc: httpx.RequestError) -> bool:
    """Whether `call` may be sent again after `exc`: any call when the connection failed
    while it was being made (nothing of the request was sent; a refused certificate
    excepted: that is no accident), an idempotent one also when it broke afterwards (a
    replica killed mid-request: the balancer sends the next connection elsewhere).
    Timeouts are never retried (the server may be busy with it)."""
    if isinstance(exc, httpx.TimeoutException):
        return False
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(exc)):
        return False
    if isinstance(exc, httpx.ConnectError):
        return True
    return call.idempotent and isinstance(
        exc, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError
    )


def send_retrying_broken(
    send: Callable[[], T], call: Call, sleep: Callable[[float], None] = time.sleep
) -> T:
    """`send()`, again on a new connection (at most BROKEN_RETRIES times) while its
    connection broke in a way `broken_retryable` allows; then the last error is raised."""
    for attempt in range(BROKEN_RETRIES + 1):
        try:
            return send()
        except httpx.RequestError as exc:
            if attempt == BROKEN_RETRIES or not broken_retryable(call, exc):
                raise
            _log_broken(call, exc, attempt)
        sleep(_BROKEN_BACKOFF * (attempt + 1))
    raise AssertionError("unreachable")


async def asend_retrying_broken(send: Callable[[], Awaitable[T]], call: Call) -> T:
    """`send_retrying_broken` for the AsyncClient."""
    for attempt in range(BROKEN_RETRIES + 1):
        try:
            return await send()
        except httpx.RequestError as exc:
            if attempt == BROKEN_RETRIES or not broken_retryable(call, exc):
                raise
            _log_broken(call, exc, attempt)
        await asyncio.sleep(_BROKEN_BACKOFF * (attempt + 1))
    raise AssertionError("unreachable")


def _log_broken(call: Call, exc: BaseException, attempt: int) -> None:
    log.info(
        "%s %s: the connection broke (%s); sending it again on a new connection (%d of %d)",
        call.method,
        call.path,
        type(exc).__name__,
        attempt + 1,
        BROKEN_RETRIES,
    )


def json_answer(response: httpx.Response, build: Callable[[Any], T]) -> T:
    """`build(the JSON answer)`; a ProtocolError if the answer is not what the API sends."""
    try:
        return build(response.json())
    except BlindInferError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        request = response.request
        raise ProtocolError(
            "malformed_answer",
            f"the server's answer to {request.method} {request.url.path} is not the API's: "
            f"{type(exc).__name__}: {exc}",
        ) from exc


def model_list(document: Any) -> list[ModelInfo]:
    if not isinstance(document, list):
        raise TypeError("the model index is not a list")
    return [ModelInfo.from_json(item) for item in document]


def policy_of(policy: object) -> Policy:
    """`connect()`'s policy argument as a Policy: UsageError for a missing file, a directory
    or something that is no policy at all; PolicyError (from load_policy) if malformed."""
    if isinstance(policy, str | os.PathLike):
        path = Path(policy)
        if not path.exists():
            raise UsageError(
                f"policy file {str(path)!r} does not exist (pass the path of a policy TOML file, "
                "e.g. one written by `blindinfer policy --from URL`, a Policy or a dict)"
            )
        if path.is_dir():
            raise UsageError(f"policy path {str(path)!r} is a directory, not a policy file")
        return load_policy(path)
    if isinstance(policy, Policy | Mapping):
        return load_policy(policy)
    raise UsageError(
        f"policy must be a blindinfer.Policy, a dict, or the path of a policy file, "
        f"got {type(policy).__name__}"
    )


def server_error(response: httpx.Response) -> ServerError:
    try:
        document = response.json()
        return ServerError(response.status_code, str(document["code"]), str(document["error"]))
    except (ValueError, KeyError, TypeError):
        return ServerError(response.status_code, "http_error", response.text[:200])


def retry_delay(policy: RetryPolicy, attempt: int, response: httpx.Response) -> float | None:
    """Seconds to wait before sending again after this refusal, or None: raise it."""
    return policy.delay(
        attempt,
        response.status_code,
        response.headers.get("retry-after"),
        now=time.time(),
        random=random.random(),  # noqa: S311 - jitter, not a secret
    )


def send_with_retries(
    send: Callable[[], httpx.Response],
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
) -> httpx.Response:
    """`send()` until it is not refused with a retryable status; raises ServerError on >= 400."""
    attempt = 1
    while True:
        response = send()
        if response.status_code < 400:
            return response
        wait = _next_wait(policy, attempt, response)
        sleep(wait)
        attempt += 1


async def asend_with_retries(
    send: Callable[[], Awaitable[httpx.Response]],
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> httpx.Response:
    """`send_with_retries` for the AsyncClient: waits without blocking the event loop."""
    attempt = 1
    while True:
        response = await send()
        if response.status_code < 400:
            return response
        wait = _next_wait(policy, attempt, response)
        await sleep(wait)
        attempt += 1


def _next_wait(policy: RetryPolicy, attempt: int, response: httpx.Response) -> float:
    wait = retry_delay(policy, attempt, response)
    if wait is None:
        raise server_error(response)
    log.info(
        "HTTP %d %s %s; retrying in %.2f s (attempt %d of at most %d)",
        response.status_code,
        response.request.method,
        response.request.url.path,
        wait,
        attempt + 1,
        policy.max_attempts,
    )
    return wait


def http_options(
    url: str,
    attestation: VerifiedAttestation,
    *,
    timeout: float,
    api_key: str | None,
    max_connections: int | None,
    asynchronous: bool,
    context: ssl.SSLContext | None = None,
    gate: KeyGate | None = None,
) -> dict[str, Any]:
    """httpx client arguments: a pool of connections that trust only the attested key.

    The API key travels in a header of this client only, that is, only once the
    attestation verified and only to the pinned certificate. `context`: the pinned
    context to use (the Client shares its own with its fast path, client/pinned_http.py).
    `gate`: a replica-set client's check instead of the pin: every new connection's key
    is attested before a request goes on it (client/replica_gate.py).
    """
    if gate is not None:
        context = gated_context()
    elif context is None:
        context = pinned_context(attestation.certificate_der)
    pool: dict[str, Any] = {}  # httpx's defaults (100 connections, 20 kept alive) otherwise
    if max_connections is not None:
        pool["limits"] = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
    transport: httpx.HTTPTransport | httpx.AsyncHTTPTransport
    if asynchronous and gate is not None:
        limits = pool.get("limits", httpx.Limits(max_connections=100, max_keepalive_connections=20))
        transport = gated_async_transport(gate, NO_DELAY, limits)
    elif asynchronous:
        transport = httpx.AsyncHTTPTransport(verify=context, socket_options=NO_DELAY, **pool)
    else:
        transport = coalescing_transport(context, NO_DELAY, gate=gate, **pool)  # coalesce.py
    return {
        "base_url": url,
        "transport": transport,
        "timeout": timeout,
        "headers": {"authorization": f"Bearer {api_key}"} if api_key else {},
    }
