"""The proxy's local guard on ASGI scopes as uvicorn builds them (the end-to-end attacks are
in tests/e2e/test_proxy_e2e.py): which Host names, origins and tokens pass."""

from __future__ import annotations

from typing import Any

import pytest

from blindinfer.protocol.content_types import content_type_refusal, oip_media_types
from blindinfer.proxy.guard import LocalGuard, check_origin_entry, parse_host


def scope(
    host: str | None,
    *,
    server: tuple[str, int | None] | None = ("127.0.0.1", 8000),
    path: str = "/v2",
    method: str = "GET",
    **headers: str,
) -> dict[str, Any]:
    raw = [] if host is None else [(b"host", host.encode())]
    raw += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "server": server, "path": path, "method": method, "headers": raw}


def code(guard: LocalGuard, request: dict[str, Any]) -> str | None:
    refusal = guard.check(request)
    return None if refusal is None else refusal.code


@pytest.mark.parametrize(
    ("host", "server", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000), None),
        ("localhost:8000", ("127.0.0.1", 8000), None),
        ("LocalHost:8000", ("127.0.0.1", 8000), None),
        ("[::1]:8000", ("::1", 8000), None),
        ("localhost:8000", ("::1", 8000), None),
        ("127.0.0.1:8000", ("::ffff:127.0.0.1", 8000), None),
        ("192.168.1.5:8000", ("192.168.1.5", 8000), None),  # --allow-remote, by IP
        ("localhost:8000", ("192.168.1.5", 8000), "host_not_allowed"),
        ("evil.example:8000", ("127.0.0.1", 8000), "host_not_allowed"),
        ("evil.example", ("127.0.0.1", 8000), "host_not_allowed"),
        ("127.0.0.1:8001", ("127.0.0.1", 8000), "host_not_allowed"),
        ("127.0.0.2:8000", ("127.0.0.1", 8000), "host_not_allowed"),
        ("localhost.:8000", ("127.0.0.1", 8000), "host_not_allowed"),
        ("127.0.0.1:8000:1", ("127.0.0.1", 8000), "host_not_allowed"),
        ("[::1:8000", ("::1", 8000), "host_not_allowed"),
        (None, ("127.0.0.1", 8000), "host_not_allowed"),
        ("anything", ("/run/proxy.sock", None), None),  # a Unix socket
        ("127.0.0.1:8000", None, "host_not_allowed"),  # no listening address known
    ],
)
def test_host(
    host: str | None, server: tuple[str, int | None] | None, expected: str | None
) -> None:
    assert code(LocalGuard(), scope(host, server=server)) == expected


def test_allowed_hosts() -> None:
    guard = LocalGuard.build(allow_hosts=["Proxy.LAN", "other.lan:9000"])
    assert code(guard, scope("proxy.lan:8000")) is None
    assert code(guard, scope("proxy.lan:8001")) == "host_not_allowed"
    assert code(guard, scope("other.lan:9000")) is None
    assert code(guard, scope("other.lan:8000")) == "host_not_allowed"


def test_origins_and_fetch_metadata() -> None:
    guard = LocalGuard.build(allow_origins=["http://localhost:3000/"])
    local = "127.0.0.1:8000"
    assert code(guard, scope(local, origin="http://localhost:3000")) is None
    assert code(guard, scope(local, origin="HTTP://LOCALHOST:3000")) is None
    assert code(guard, scope(local, origin="http://localhost:3001")) == "origin_not_allowed"
    assert code(guard, scope(local, origin="null")) == "origin_not_allowed"
    assert code(guard, scope(local, sec_fetch_site="cross-site")) == "cross_site_request"
    assert code(guard, scope(local, sec_fetch_site="same-site")) == "cross_site_request"
    assert code(guard, scope(local, sec_fetch_site="same-origin")) is None
    assert code(guard, scope(local, sec_fetch_site="none")) is None
    assert guard.cors_headers(scope(local, origin="http://evil.example")) == []
    assert guard.cors_headers(scope(local)) == []
    assert (
        dict(guard.cors_headers(scope(local, origin="http://localhost:3000")))[
            b"access-control-allow-origin"
        ]
        == b"http://localhost:3000"
    )


def test_token() -> None:
    guard = LocalGuard.build(access_token="k" * 32)
    local = "127.0.0.1:8000"
    assert code(guard, scope(local)) == "proxy_token_required"
    assert code(guard, scope(local, x_blindinfer_proxy_token="k" * 31)) == "proxy_token_required"
    assert code(guard, scope(local, x_blindinfer_proxy_token="k" * 32)) is None


@pytest.mark.parametrize(
    ("path", "content_type", "refused"),
    [
        ("/v2/repository/models/m/upload", "application/octet-stream", False),
        ("/v2/repository/models/m/upload", "application/json", True),
        ("/v2/models/m/infer", "application/json; charset=utf-8", False),
        ("/v2/models/m/versions/1/infer", "application/octet-stream", False),
        ("/v2/models/m/infer", "text/plain", True),
        ("/v2/repository/models/m/share", "application/json", False),
        ("/v2/repository/models/m/share", "text/plain;charset=UTF-8", True),
        ("/v2/repository/models/m/unload", "application/x-www-form-urlencoded", True),
        ("/v2/repository/models/m/unload", "multipart/form-data; boundary=x", True),
        ("/v2/repository/index", "", True),
    ],
)
def test_content_types(path: str, content_type: str, refused: bool) -> None:
    assert (content_type_refusal([content_type], oip_media_types(path)) is not None) is refused
    assert content_type_refusal([], oip_media_types(path)) is None  # none: tritonclient


def test_option_values() -> None:
    assert check_origin_entry("https://App.example:8443/") == "https://app.example:8443"
    for bad in ("*", "app.example", "https://app.example/path", "ftp://x"):
        with pytest.raises(ValueError, match="not an origin"):
            check_origin_entry(bad)
    assert parse_host("[::1]:80") == ("::1", 80)
    for bad in ("", ":80", "host:0", "host:65536", "host:8a", "[zz]:80"):
        with pytest.raises(ValueError, match=r"\w"):
            parse_host(bad)
