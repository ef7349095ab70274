"""Who may use the proxy: it must not be a confused deputy for web pages.

The proxy adds its API key to what it forwards, so whoever can make a request reach it
acts with that key. Programs on the machine are meant to; web pages in the user's browser
are not, and a browser reaches loopback too:

- A page on any site can send a cross-origin POST without a CORS preflight (a "simple
  request": text/plain, form or multipart body, or no body). The browser marks it with
  `Origin` (and `Sec-Fetch-Site: cross-site`): refused unless that origin was allowed.
- After DNS rebinding (a name of the attacker's that now resolves to 127.0.0.1), the page
  is "same-origin" with the proxy and may read the answers; its requests name the
  attacker's host in `Host`: refused unless `Host` names the address the connection
  arrived on (its IP literal, or `localhost` on a loopback address) or an allowed host.
- A Content-Type the route does not read (the simple-request types) is refused with 415
  before anything is forwarded (`blindinfer.protocol.content_types`).
- Optionally a local access token (`X-Blindinfer-Proxy-Token`), for other local users or
  processes; never forwarded.

A Unix-socket listener has no Host check (no browser can connect to one); its file
permissions decide who may connect. CORS headers are sent only to an allowed origin.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from blindinfer.protocol.content_types import (
    UNSUPPORTED_MEDIA_TYPE,
    content_type_refusal,
    header_values,
    oip_media_types,
)
from blindinfer.protocol.error_shapes import error_document

TOKEN_HEADER = "x-blindinfer-proxy-token"  # noqa: S105 - a header name, not a secret
"""The header that carries the local access token (`--access-token-file`)."""

CROSS_SITE = frozenset({b"cross-site", b"same-site"})
CORS_METHODS = b"GET, POST, PUT, DELETE"
CORS_HEADERS = b"content-type, inference-header-content-length, " + TOKEN_HEADER.encode()
CORS_EXPOSED = b"inference-header-content-length"
CORS_MAX_AGE = b"600"


@dataclass(frozen=True, slots=True)
class Refusal:
    """What the proxy answers instead of forwarding."""

    status: int
    code: str
    message: str

    def document(self, path: str = "") -> dict[str, object]:
        """The answer's body, in the shape of the API `path` belongs to (OpenAI's on /v1)."""
        return error_document(path, self.status, self.code, self.message)


def parse_host(value: str) -> tuple[str, int | None]:
    """`Host`'s value as (lower-case name or IP literal, port or None); ValueError if it
    is no host[:port]."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unterminated IPv6 literal")
        name, rest = text[1:end], text[end + 1 :]
        ipaddress.IPv6Address(name)
        if rest and not rest.startswith(":"):
            raise ValueError("junk after the IPv6 literal")
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if sep else None
        if not name or ":" in port_text_or_empty:
            raise ValueError("no host name")
    if port_text is None:
        return name, None
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ValueError("invalid port")
    port = int(port_text)
    if not 0 < port <= 65535:
        raise ValueError("port out of range")
    return name, port


def _canonical(name: str) -> str:
    """An IP literal in canonical form (IPv4-mapped IPv6 as IPv4); names unchanged.
    Cached (parsing an address cost ~10 us on every request): the names clients send are
    few, and only names up to DNS's 253 characters are kept (64 of them at most)."""
    return _canonical_cached(name) if len(name) <= 253 else _canonical_uncached(name)


@functools.lru_cache(maxsize=64)
def _canonical_cached(name: str) -> str:
    return _canonical_uncached(name)


def _canonical_uncached(name: str) -> str:
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return name
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def parse_allowed_host(value: str) -> tuple[str, int | None]:
    """An `--allow-host` entry: NAME or NAME:PORT ([V6]:PORT); without a port it stands
    for the port the connection arrived on."""
    name, port = parse_host(value)
    return _canonical(name), port


def normalize_origin(value: str) -> str:
    """An `--allow-origin` entry or an `Origin` header, compared case-insensitively and
    without a trailing slash (`null` stays `null`)."""
    return value.strip().lower().rstrip("/")


def check_origin_entry(value: str) -> str:
    """An `--allow-origin` entry: scheme://host[:port] (or `null`); ValueError otherwise."""
    origin = normalize_origin(value)
    if origin == "null":
        return origin
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest or origin == "*":
        raise ValueError(f"not an origin (scheme://host[:port]): {value!r}")
    return origin


@dataclass(frozen=True, slots=True)
class LocalGuard:
    """The checks every local request passes before the proxy does anything with it."""

    allow_hosts: frozenset[tuple[str, int | None]] = frozenset()
    allow_origins: frozenset[str] = frozenset()
    access_token: str | None = None

    @classmethod
    def build(
        cls,
        allow_hosts: Iterable[str] = (),
        allow_origins: Iterable[str] = (),
        access_token: str | None = None,
    ) -> LocalGuard:
        return cls(
            frozenset(parse_allowed_host(h) for h in allow_hosts),
            frozenset(check_origin_entry(o) for o in allow_origins),
            access_token,
        )

    def check(self, scope: MutableMapping[str, Any]) -> Refusal | None:
        """None when the request may go on; else why not. Order: Host, Origin and
        Sec-Fetch-Site, token, Content-Type."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        refusal = self._check_host(scope, headers)
        if refusal is None:
            refusal = self._check_browser(headers)
        if refusal is None and not is_preflight(scope):  # a preflight carries no token
            refusal = self._check_token(headers)
        if refusal is None:
            message = content_type_refusal(header_values(headers), oip_media_types(scope["path"]))
            if message is not None:
                refusal = Refusal(415, UNSUPPORTED_MEDIA_TYPE, message)
        return refusal

    def _check_host(
        self, scope: MutableMapping[str, Any], headers: list[tuple[bytes, bytes]]
    ) -> Refusal | None:
        server = scope.get("server")
        if server is not None and server[1] is None:
            return None  # a Unix socket: no browser connects to one
        values = [value for name, value in headers if name == b"host"]
        if len(values) != 1:
            return _host_refusal("the request must carry exactly one Host header")
        try:
            name, port = parse_host(values[0].decode("latin-1"))
        except ValueError:
            return _host_refusal("the Host header is malformed")
        name = _canonical(name)
        local_port = int(server[1]) if server is not None else None
        port = 80 if port is None else port
        if (name, port) in self.allow_hosts or (
            (name, None) in self.allow_hosts and port == local_port
        ):
            return None
        if server is not None and port == local_port and name in _own_names(str(server[0])):
            return None
        shown = values[0].decode("latin-1")[:100]
        return _host_refusal(
            f"Host {shown!r} is not this proxy's address (a DNS rebinding attack looks like "
            "this); call it by the address it listens on, or allow the name with --allow-host"
        )

    def _check_browser(self, headers: list[tuple[bytes, bytes]]) -> Refusal | None:
        origins = [value for name, value in headers if name == b"origin"]
        if origins:
            if len(origins) == 1 and self.origin_allowed(origins[0]):
                return None
            shown = origins[0].decode("latin-1")[:100]
            return Refusal(
                403,
                "origin_not_allowed",
                f"requests from web pages (Origin {shown!r}) are refused: a page could use "
                "the proxy's API key; allow a trusted origin with --allow-origin",
            )
        sites = [value.strip().lower() for name, value in headers if name == b"sec-fetch-site"]
        if any(site in CROSS_SITE for site in sites):
            return Refusal(
                403,
                "cross_site_request",
                "a browser sent this request for another site (Sec-Fetch-Site); refused",
            )
        return None

    def _check_token(self, headers: list[tuple[bytes, bytes]]) -> Refusal | None:
        if self.access_token is None:
            return None
        given = [value for name, value in headers if name == TOKEN_HEADER.encode()]
        expected = self.access_token.encode()
        if len(given) == 1 and hmac.compare_digest(given[0].strip(), expected):
            return None
        return Refusal(
            401,
            "proxy_token_required",
            f"this proxy requires its access token in the {TOKEN_HEADER} header "
            "(see --access-token-file)",
        )

    def origin_allowed(self, origin: bytes) -> bool:
        return normalize_origin(origin.decode("latin-1")) in self.allow_origins

    def cors_headers(self, scope: MutableMapping[str, Any]) -> list[tuple[bytes, bytes]]:
        """CORS response headers: only for an allowed origin, never otherwise."""
        origins = [value for name, value in scope["headers"] if name == b"origin"]
        if len(origins) != 1 or not self.origin_allowed(origins[0]):
            return []
        return [
            (b"access-control-allow-origin", origins[0]),
            (b"access-control-expose-headers", CORS_EXPOSED),
            (b"vary", b"Origin"),
        ]

    def preflight_headers(self, scope: MutableMapping[str, Any]) -> list[tuple[bytes, bytes]]:
        return [
            *self.cors_headers(scope),
            (b"access-control-allow-methods", CORS_METHODS),
            (b"access-control-allow-headers", CORS_HEADERS),
            (b"access-control-max-age", CORS_MAX_AGE),
        ]


def is_preflight(scope: MutableMapping[str, Any]) -> bool:
    """A CORS preflight: OPTIONS with Origin and Access-Control-Request-Method."""
    if scope.get("method") != "OPTIONS":
        return False
    names = {name for name, _ in scope["headers"]}
    return b"origin" in names and b"access-control-request-method" in names


@functools.lru_cache(maxsize=16)
def _own_names(address: str) -> frozenset[str]:
    """The names a Host header may use for the local address a connection arrived on:
    its IP literal, and `localhost` when it is a loopback address."""
    canonical = _canonical(address)
    try:
        loopback = ipaddress.ip_address(canonical).is_loopback
    except ValueError:
        return frozenset({canonical})
    return frozenset({canonical, "localhost"}) if loopback else frozenset({canonical})


def _host_refusal(message: str) -> Refusal:
    return Refusal(421, "host_not_allowed", message)


__all__ = [
    "TOKEN_HEADER",
    "LocalGuard",
    "Refusal",
    "check_origin_entry",
    "is_preflight",
    "parse_allowed_host",
    "parse_host",
]
