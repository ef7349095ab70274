"""One check for the URL of a Confidential Containers service on the pod VM's loopback.

Why one place: the Confidential Data Hub (the store key, store/key_release.py) and the
Attestation Agent (evidence, tee/coco_agent.py) are both reached through guest-components'
api-server-rest, which serves plain HTTP on ``127.0.0.1:8006`` inside the pod VM and
answers loopback peers only (api-server-rest/src/main.rs ``DEFAULT_BIND``,
api-server-rest/src/router.rs ``is_loopback``). Either answer must come from inside this
pod VM: a key from elsewhere could be the host's, evidence from elsewhere would be another
machine's. So the URL is ``http://`` to a literal loopback address (127.0.0.0/8 or ::1),
never a host name (``localhost`` resolves through ``/etc/hosts``, which Kubernetes writes
from outside the TEE), with no credentials, path, query or fragment, and no port 0.
"""

from __future__ import annotations

import ipaddress
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import httpx

from blindinfer.errors import UsageError

MAX_URL_CHARS: Final = 512
_MAX_QUOTED: Final = 80


def _quoted(text: str) -> str:
    """`text` for a message: repr, cut short (a message must stay one or two lines)."""
    return repr(text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "...")


def check_loopback_url(
    text: str, *, service: str, why: str, hint: str, error: type[UsageError]
) -> str:
    """``http://<loopback address>:<port>``, normalised, or `error` (what is wrong, then `hint`).

    `service` names the service in messages ("Confidential Data Hub"); `why` ends the
    refusal of a non-loopback address (what an answer from elsewhere could be).
    """
    if not isinstance(text, str) or len(text) > MAX_URL_CHARS:
        raise error(f"the {service} URL is not a short string\n" + hint)
    name = f"{service} URL"
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise error(f"{name} {_quoted(text)} is malformed ({exc})\n" + hint) from None
    if parts.scheme != "http":
        raise error(
            f"{name} {_quoted(text)} is not http:// (its REST API serves plain HTTP on "
            "loopback, inside the pod VM)\n" + hint
        )
    if parts.username is not None or parts.password is not None:
        raise error(f"{name} {_quoted(text)} carries credentials\n" + hint)
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise error(
            f"{name} {_quoted(text)} has a path, query or fragment: give only "
            "http://address:port\n" + hint
        )
    host = parts.hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise error(
            f"{name} {_quoted(text)} names a host, not a loopback address (names resolve "
            "through /etc/hosts, which the host writes)\n" + hint
        ) from None
    loopback = (address.version == 4 and address.is_loopback) or address == ipaddress.ip_address(
        "::1"
    )
    if not loopback:
        raise error(f"{name} {_quoted(text)} is not a loopback address: {why}\n" + hint)
    if port == 0:
        raise error(f"{name} {_quoted(text)} has port 0\n" + hint)
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{shown}:{port if port is not None else 80}"


def printable(body: bytes, limit: int = 200) -> str:
    """An error answer's text, for a one-line message: printable ASCII, cut short."""
    text = "".join(c if " " <= c <= "~" else " " for c in body.decode("ascii", "replace"))
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return text or "no body"


def reason(exc: BaseException) -> str:
    """An HTTP client error's text, for a one-line message."""
    return printable(str(exc).encode("utf-8", "replace")) if str(exc) else type(exc).__name__


@dataclass(frozen=True, slots=True)
class LoopbackAnswer:
    """What api-server-rest answered: its status, content encoding (lower case) and at
    most `limit + 1` bytes of body (more means too large: the caller says so in its words)."""

    status: int
    content_encoding: str
    body: bytes


def bounded_get(
    url: str,
    *,
    limit: int,
    timeout_s: float,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> LoopbackAnswer:
    """One GET to a service on the pod VM's loopback, bounded in size and in total time.

    No proxy from the environment (the host sets it), no redirects (an answer must come
    from the URL that was checked), the body read raw (no decompression to inflate it).
    Raises httpx's errors, which each caller words for its own service.
    """
    deadline = time.monotonic() + timeout_s
    with (
        httpx.Client(trust_env=False, follow_redirects=False, timeout=timeout_s) as http,
        http.stream(
            "GET",
            url,
            params=params,
            headers={**(headers or {}), "Accept-Encoding": "identity"},
        ) as response,
    ):
        body = bytearray()
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > limit:
                break
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("the answer took too long")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        return LoopbackAnswer(response.status_code, encoding, bytes(body))
