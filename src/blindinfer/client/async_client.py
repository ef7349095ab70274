"""`AsyncClient`: the `Client` API for asyncio, over the same verification and pinning.

    client = await blindinfer.connect_async(url, policy=..., simulation=...)
    async with blindinfer.AsyncClient.connect(url, policy=...) as client:
        outputs = await client.run_model("classifier", {"x": x})

The attestation is the synchronous one (`attest`: fresh nonce, evidence, verification,
policy), run in a worker thread so the event loop keeps going; only once it verified is an
`httpx.AsyncClient` made, whose connections trust exactly the attested certificate. Requests
are built, answers read and refusals retried by the code `Client` uses
(`blindinfer.client.common`, `blindinfer.client.retry`). One AsyncClient serves any number
of concurrent tasks over its pool of connections (`max_connections`). With `replicas=N`
every new connection's key is attested on it first, as in `connect()`
(`blindinfer.client.replica_gate`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from blindinfer.attestation.policy import Policy
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.client.attested_keys import (
    DEFAULT_MAX_AGE_SECONDS,
    AttestedKey,
)
from blindinfer.client.client import attest_unwarned, plan_connect
from blindinfer.client.common import (
    INDEX_CALL,
    Call,
    Progress,
    asend_retrying_broken,
    asend_with_retries,
    build_request,
    delete_call,
    http_options,
    infer_call,
    infer_outputs,
    json_answer,
    metadata_call,
    model_list,
    needs_input_names,
    request_errors,
    share_call,
    upload_call,
)
from blindinfer.client.grpc_pin import announced_port
from blindinfer.client.grpc_transport import (
    GrpcTransport,
    open_channel,
)
from blindinfer.client.models import ModelInfo, ModelMetadata
from blindinfer.client.openai_sdk import openai_client
from blindinfer.client.replica_gate import KeyGate, attest_first
from blindinfer.client.retry import DEFAULT_RETRY, RetryPolicy
from blindinfer.client.tensors import to_arrays
from blindinfer.client.transport import check_url
from blindinfer.protocol.limits import TensorLimits


async def connect_async(
    url: str,
    *,
    policy: Policy | str | Path | dict[str, Any],
    simulation: bool = False,
    timeout: float = 60.0,
    collateral_url: str | None = None,
    api_key: str | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    max_connections: int | None = None,
    allow_insecure_http: bool = False,
    replicas: int = 1,
    max_attestation_age: float = DEFAULT_MAX_AGE_SECONDS,
    transport: str = "https",
    grpc_port: int | None = None,
) -> AsyncClient:
    """`connect()` for asyncio: returns only once the evidence verified against `policy`;
    raises the same `blindinfer.BlindInferError`s as `connect()`. `replicas`,
    `max_attestation_age`: as in `connect()` (several replicas behind one address).
    `transport`, `grpc_port`: as in `connect()`; with "grpc", `run_model` and
    `model_metadata` run the sync gRPC channel's calls in a worker thread."""
    return await _connect(
        url,
        policy=policy,
        simulation=simulation,
        timeout=timeout,
        collateral_url=collateral_url,
        api_key=api_key,
        retry=retry,
        max_connections=max_connections,
        stacklevel=3,
        allow_insecure_http=allow_insecure_http,
        replicas=replicas,
        max_attestation_age=max_attestation_age,
        transport=transport,
        grpc_port=grpc_port,
    )


async def _connect(
    url: str,
    *,
    policy: Policy | str | Path | dict[str, Any],
    simulation: bool,
    timeout: float,
    collateral_url: str | None,
    api_key: str | None,
    retry: RetryPolicy,
    max_connections: int | None,
    stacklevel: int,
    allow_insecure_http: bool = False,
    replicas: int = 1,
    max_attestation_age: float = DEFAULT_MAX_AGE_SECONDS,
    transport: str = "https",
    grpc_port: int | None = None,
) -> AsyncClient:
    plan = plan_connect(
        url,
        policy,
        simulation,
        collateral_url,
        allow_insecure_http,
        replicas=replicas,
        max_attestation_age=max_attestation_age,
        transport=transport,
        grpc_port=grpc_port,
        stacklevel=stacklevel,
    )
    base, loaded, gate = plan.url, plan.policy, plan.gate
    if gate is not None:
        first = await asyncio.to_thread(attest_first, gate, timeout)
        return AsyncClient(
            base,
            first.attestation,
            timeout=timeout,
            api_key=api_key,
            retry=retry,
            max_connections=max_connections,
            gate=gate,
        )
    verified = await asyncio.to_thread(
        attest_unwarned,
        base,
        policy=loaded,
        simulation=simulation,
        timeout=timeout,
        collateral_url=collateral_url,
        allow_insecure_http=allow_insecure_http,
    )
    client = AsyncClient(
        base,
        verified,
        timeout=timeout,
        api_key=api_key,
        retry=retry,
        max_connections=max_connections,
    )
    if transport == "grpc":
        try:
            await client._open_grpc(grpc_port)
        except BaseException:
            await client.close()
            raise
    return client


class _Connecting:
    """What `AsyncClient.connect()` returns: await it, or use it with `async with`."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self._url = url
        self._options = options
        self._client: AsyncClient | None = None

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        return _connect(self._url, **self._options, stacklevel=2).__await__()

    async def __aenter__(self) -> AsyncClient:
        self._client = await _connect(self._url, **self._options, stacklevel=3)
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()


class AsyncClient:
    """Talks only to the certificate that the verified evidence bound; asyncio version of
    `Client`, with the same methods as coroutines."""

    def __init__(
        self,
        url: str,
        attestation: VerifiedAttestation,
        *,
        timeout: float,
        api_key: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_connections: int | None = None,
        gate: KeyGate | None = None,
    ) -> None:
        self.url = check_url(url)
        self.attestation = attestation
        self.retry = retry
        self._timeout = timeout
        self._api_key = api_key
        self._gate = gate
        self._http = httpx.AsyncClient(
            **http_options(
                url,
                attestation,
                timeout=timeout,
                api_key=api_key,
                max_connections=max_connections,
                asynchronous=True,
                gate=gate,
            )
        )
        self._metadata: dict[str, ModelMetadata] = {}
        self._limits = TensorLimits()
        self._grpc: GrpcTransport | None = None
        self.transport = "https"
        """"https", or "grpc" (`connect(..., transport="grpc")`)."""

    async def _open_grpc(self, port: int | None) -> None:
        """As `Client`'s: the pinned channel to the attested key (client/grpc_transport.py);
        its calls are the sync channel's, run in a worker thread."""
        if port is None:
            response = await self._send(Call("GET", "/v2", idempotent=True))
            port = json_answer(response, announced_port)
        self._grpc = await asyncio.to_thread(
            open_channel,
            self.url,
            port,
            self.attestation.certificate_der,
            api_key=self._api_key,
            timeout=self._timeout,
            retry=self.retry,
            limits=self._limits,
        )
        self.transport = "grpc"

    def async_openai(self) -> Any:
        """An `openai.AsyncOpenAI` for this server's `/v1` API on the pinned, attested
        connection only (`blindinfer.client.openai_sdk`). Needs the `openai` package."""
        return openai_client(
            self.url,
            self.attestation.certificate_der,
            api_key=self._api_key,
            timeout=self._timeout,
            asynchronous=True,
            gate=self._gate,
        )

    @property
    def attested_keys(self) -> list[AttestedKey]:
        """As `Client.attested_keys`: the keys trusted now (replica mode), else the pin."""
        if self._gate is not None:
            return self._gate.keys.admitted()
        return [AttestedKey(self.attestation, None, 0.0)]

    @staticmethod
    def connect(
        url: str,
        *,
        policy: Policy | str | Path | dict[str, Any],
        simulation: bool = False,
        timeout: float = 60.0,
        collateral_url: str | None = None,
        api_key: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_connections: int | None = None,
        allow_insecure_http: bool = False,
        replicas: int = 1,
        max_attestation_age: float = DEFAULT_MAX_AGE_SECONDS,
        transport: str = "https",
        grpc_port: int | None = None,
    ) -> _Connecting:
        """`await AsyncClient.connect(...)` or `async with AsyncClient.connect(...) as c`."""
        return _Connecting(
            url,
            {
                "policy": policy,
                "simulation": simulation,
                "timeout": timeout,
                "collateral_url": collateral_url,
                "api_key": api_key,
                "retry": retry,
                "max_connections": max_connections,
                "allow_insecure_http": allow_insecure_http,
                "replicas": replicas,
                "max_attestation_age": max_attestation_age,
                "transport": transport,
                "grpc_port": grpc_port,
            },
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()
        if self._grpc is not None:
            self._grpc.close()

    async def upload_model(
        self,
        model: str | Path | bytes | Any,
        *,
        name: str | None = None,
        share_with: Sequence[str] = (),
        progress: Progress | None = None,
    ) -> ModelInfo:
        """See `Client.upload_model`; `progress` is called on the event loop."""
        response = await self._send(upload_call(model, name, share_with, progress))
        return json_answer(response, ModelInfo.from_json)

    async def delete_model(self, model: str) -> ModelInfo:
        response = await self._send(delete_call(model))
        self._metadata.pop(model, None)
        return json_answer(response, ModelInfo.from_json)

    async def share_model(self, model: str, tenants: Sequence[str]) -> ModelInfo:
        """Lets other tenants run `model` ("*" = every tenant); [] makes it private again."""
        return json_answer(await self._send(share_call(model, tenants)), ModelInfo.from_json)

    async def list_models(self) -> list[ModelInfo]:
        return json_answer(await self._send(INDEX_CALL), model_list)

    async def model_metadata(self, model: str) -> ModelMetadata:
        if model not in self._metadata:
            if self._grpc is not None:
                found = await asyncio.to_thread(self._grpc.model_metadata, model)
            else:
                found = json_answer(await self._send(metadata_call(model)), ModelMetadata.from_json)
            self._metadata[model] = found
        return self._metadata[model]

    async def run_model(
        self, model: str, inputs: object, *, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Runs `model` (name, model_id or SHA-256) and returns its outputs by name."""
        names: list[str] = []
        if needs_input_names(inputs):
            names = [i.name for i in (await self.model_metadata(model)).inputs]
        arrays = to_arrays(inputs, names)
        if self._grpc is not None:
            results, _ = await asyncio.to_thread(self._grpc.infer, model, arrays, outputs)
            return results
        response = await self._send(infer_call(model, arrays, outputs))
        return infer_outputs(response, self._limits)

    async def _send(self, call: Call) -> httpx.Response:
        async def once() -> httpx.Response:
            return await self._http.send(build_request(self._http, call, asynchronous=True))

        async def attempt() -> httpx.Response:
            with request_errors(self.url, self._timeout, call):
                return await asend_retrying_broken(once, call)

        return await asend_with_retries(attempt, self.retry)
