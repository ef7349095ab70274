"""The official `openai` SDK on blindinfer's attested channel.

`openai_client(...)` builds an `openai.OpenAI` (or `AsyncOpenAI`) whose HTTP client is an
`httpx2` client (the HTTP library that SDK uses) trusting only the attested, pinned TLS key,
with proxy variables of the environment ignored, and whose base URL is the server's `/v1`.
So every request the SDK makes goes to the attested server and nowhere else. The `openai`
package is optional: without it this is a UsageError saying how to install it.

A replica-set client (`gate`, `connect(..., replicas=N)`) gives the SDK's transport a pool
whose every new connection passes the same key check as the client's own connections
(`replica_gate.gated_httpx2_transport`): no SDK request goes to an unattested replica.
"""

from __future__ import annotations

from typing import Any

from blindinfer.client.replica_gate import KeyGate, gated_httpx2_transport
from blindinfer.client.transport import pinned_context
from blindinfer.errors import UsageError

__all__ = ["OPEN_MODE_KEY", "openai_client"]

OPEN_MODE_KEY = "blindinfer-open-mode"
"""Sent where the client has no API key: the SDK requires one; an open server ignores it."""


def openai_client(
    url: str,
    certificate_der: bytes,
    *,
    api_key: str | None,
    timeout: float,
    asynchronous: bool,
    gate: KeyGate | None = None,
) -> Any:
    try:
        import httpx2
        import openai
    except ImportError as exc:
        raise UsageError(
            "the openai SDK (3.x, on httpx2) is not installed: pip install 'blindinfer[openai]'"
        ) from exc
    context = pinned_context(certificate_der)
    options: dict[str, Any] = {
        "api_key": api_key or OPEN_MODE_KEY,
        "base_url": url + "/v1",
        "max_retries": 0,  # blindinfer's own retry policy is not the SDK's
    }
    if gate is not None:
        gated = gated_httpx2_transport(gate, asynchronous=asynchronous)
        if asynchronous:
            gated_async = httpx2.AsyncClient(transport=gated, trust_env=False, timeout=timeout)
            return openai.AsyncOpenAI(http_client=gated_async, **options)
        gated_sync = httpx2.Client(transport=gated, trust_env=False, timeout=timeout)
        return openai.OpenAI(http_client=gated_sync, **options)
    if asynchronous:
        transport = httpx2.AsyncHTTPTransport(verify=context, trust_env=False)
        http = httpx2.AsyncClient(transport=transport, trust_env=False, timeout=timeout)
        return openai.AsyncOpenAI(http_client=http, **options)
    sync_transport = httpx2.HTTPTransport(verify=context, trust_env=False)
    sync_http = httpx2.Client(transport=sync_transport, trust_env=False, timeout=timeout)
    return openai.OpenAI(http_client=sync_http, **options)
