"""What `Client` and `AsyncClient` share, so that only the sending differs between them.

- `Call`: one API request as data (method, path, body); built by the `*_call` functions, sent
  by either client, rebuilt into a fresh `httpx.Request` for every attempt.
- `Upload`: a model's bytes, streamed in chunks from memory or from its file with an exact
  Content-Length (the server refuses an oversized model before reading it), re-readable for
  retries, reporting progress as chunks are handed to the connection.
- `server_error`, `infer_outputs`: reading answers; `retry_delay`: the retry policy applied
  to an answer (policy and rationale in `blindinfer.client.retry`).
- `http_options`: the pinned TLS transport, pool, timeout and API key of the httpx client.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.client.retry import RetryPolicy
from blindinfer.client.transport import NO_DELAY, pinned_context
from blindinfer.errors import ServerError
from blindinfer.protocol.inference import (
    InferResponse,
    encode_infer_request,
    parse_header_length,
    parse_infer_response,
)
from blindinfer.protocol.limits import TensorLimits

log = logging.getLogger("blindinfer.client")
UPLOAD_CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]
"""`progress(bytes_sent, total_bytes)`; total is None when unknown (never, for uploads)."""


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

    @classmethod
    def of(cls, model: object, progress: Progress | None = None) -> Upload:
        if isinstance(model, bytes | bytearray | memoryview):
            data = bytes(model)
            return cls(len(data), data=data, progress=progress)
        if isinstance(model, str | Path):
            path = Path(model)
            return cls(path.stat().st_size, path=path, progress=progress)
        serialize = getattr(model, "SerializeToString", None)
        if callable(serialize):
            data = bytes(serialize())
            return cls(len(data), data=data, progress=progress)
        raise TypeError("upload a path, bytes, or an onnx.ModelProto")

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
        if self.data is not None:
            for start in range(0, self.size, UPLOAD_CHUNK):
                yield self.data[start : start + UPLOAD_CHUNK]
            return
        assert self.path is not None
        with self.path.open("rb") as handle:
            left = self.size
            while left:
                chunk = handle.read(min(UPLOAD_CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.path} shrank while it was being uploaded")
                left -= len(chunk)
                yield chunk
            if handle.read(1):
                raise OSError(f"{self.path} grew while it was being uploaded")


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
            "content-type": "application/octet-stream",
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


INDEX_CALL = Call("POST", "/v2/repository/index")


def metadata_call(model: str) -> Call:
    return Call("GET", f"/v2/models/{_quoted(model)}")


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
    return Call("POST", f"/v2/models/{_quoted(model)}/infer", content=body, headers=headers)


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
) -> dict[str, Any]:
    """httpx client arguments: a pool of connections that trust only the attested key.

    The API key travels in a header of this client only, that is, only once the
    attestation verified and only to the pinned certificate.
    """
    context = pinned_context(attestation.certificate_der)
    pool: dict[str, Any] = {}  # httpx's defaults (100 connections, 20 kept alive) otherwise
    if max_connections is not None:
        pool["limits"] = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
    transport: httpx.HTTPTransport | httpx.AsyncHTTPTransport
    if asynchronous:
        transport = httpx.AsyncHTTPTransport(verify=context, socket_options=NO_DELAY, **pool)
    else:
        transport = httpx.HTTPTransport(verify=context, socket_options=NO_DELAY, **pool)
    return {
        "base_url": url,
        "transport": transport,
        "timeout": timeout,
        "headers": {"authorization": f"Bearer {api_key}"} if api_key else {},
    }
