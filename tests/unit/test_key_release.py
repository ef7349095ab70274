"""The store key from a KBS resource through the Confidential Data Hub (store/key_release.py).

The CDH is an external service (guest-components' api-server-rest, inside the pod VM):
here a real HTTP server on loopback stands in for it (tests/support/stand_in_cdh.py), so
every request and every failure goes over real sockets.
"""

from __future__ import annotations

import base64
import socket
import string
import threading
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from blindinfer.errors import BlindInferError, UsageError
from blindinfer.server.config import ServerConfig
from blindinfer.store.errors import StoreKeyConfigError, StoreKeyUnavailableError
from blindinfer.store.key_release import (
    DEFAULT_CDH_URL,
    MAX_RESOURCE_BYTES,
    STORE_KEY_LABEL,
    KbsResource,
    check_cdh_url,
    derive_store_key,
    fetch_store_key,
)
from support.stand_in_cdh import Answer, StandInCdh

SECRET = bytes(range(32))
RESOURCE = KbsResource.parse("kbs:///blindinfer/store-key/1")
URI_HINT = "write it as kbs:///REPOSITORY/TYPE/TAG, e.g. kbs:///blindinfer/store-key/1"
CDH_HINT = "give the CDH's REST API on this pod's loopback, e.g. --cdh-url http://127.0.0.1:8006"
KEY_FILE_HINT = (
    "store one made with `head -c 32 /dev/urandom > key` (kbs-client ... set-resource "
    "--resource-file key)"
)

# -- resource URIs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kbs:///blindinfer/store-key/1", ("blindinfer", "store-key", "1", "")),
        ("kbs:///default/key/1", ("default", "key", "1", "")),
        # Trustee's own accepted example (kbs/.../resource/backend.rs): dots, not first
        ("kbs:///1.ok/2ok./3...", ("1.ok", "2ok.", "3...", "")),
        (
            "kbs:///123--_default/1Abff-_/___-afds44BC",
            ("123--_default", "1Abff-_", "___-afds44BC", ""),
        ),
        ("kbs://kbs.example:8080/alice/key/1", ("alice", "key", "1", "kbs.example:8080")),
        ("kbs://[fd00::1]:8080/a/b/c", ("a", "b", "c", "[fd00::1]:8080")),
    ],
)
def test_resource_uris_that_parse(text: str, expected: tuple[str, str, str, str]) -> None:
    parsed = KbsResource.parse(text)
    assert (parsed.repository, parsed.type, parsed.tag, parsed.kbs_address) == expected
    assert str(parsed) == text
    assert parsed.path == "/".join(expected[:3])


@pytest.mark.parametrize(
    ("text", "first_line"),
    [
        ("", "the KBS resource URI is empty"),
        (
            "http:///a/b/c",
            "KBS resource URI 'http:///a/b/c' does not start with kbs:// (the "
            "CDH's REST API reaches the KBS resource plugin only)",
        ),
        (
            "KBS:///a/b/c",
            "KBS resource URI 'KBS:///a/b/c' does not start with kbs:// (the "
            "CDH's REST API reaches the KBS resource plugin only)",
        ),
        (
            "kbs+pkcs11:///a/b/c",
            "KBS resource URI 'kbs+pkcs11:///a/b/c' does not start with "
            "kbs:// (the CDH's REST API reaches the KBS resource plugin only)",
        ),
        (
            "kbs:///a/b/c?version=2",
            "KBS resource URI 'kbs:///a/b/c?version=2' has a query or a fragment",
        ),
        ("kbs:///a/b/c#x", "KBS resource URI 'kbs:///a/b/c#x' has a query or a fragment"),
        ("kbs://host", "KBS resource URI 'kbs://host' has no path"),
        (
            "kbs:///a/b",
            "KBS resource URI 'kbs:///a/b' has 2 path segments, expected 3 (repository, type, tag)",
        ),
        (
            "kbs://a/b/c",
            "KBS resource URI 'kbs://a/b/c' has 2 path segments, expected 3 "
            "(repository, type, tag)",
        ),
        (
            "kbs:///a/b/c/d",
            "KBS resource URI 'kbs:///a/b/c/d' has 4 path segments, expected 3 "
            "(repository, type, tag)",
        ),
        (
            "kbs:///a/b/c/",
            "KBS resource URI 'kbs:///a/b/c/' has 4 path segments, expected 3 "
            "(repository, type, tag)",
        ),
        ("kbs:///a//c", "the KBS resource type is empty"),
        (
            "kbs:///../b/c",
            "KBS resource repository '..' is not a KBS resource name: up to 128 "
            "of A-Z a-z 0-9 _ - . (not first)",
        ),
        (
            "kbs:///a/.hidden/c",
            "KBS resource type '.hidden' is not a KBS resource name: up to "
            "128 of A-Z a-z 0-9 _ - . (not first)",
        ),
        (
            "kbs:///a/b/%2e%2e",
            "KBS resource tag '%2e%2e' is not a KBS resource name: up to 128 "
            "of A-Z a-z 0-9 _ - . (not first)",
        ),
        (
            "kbs:///a/b/c d",
            "KBS resource tag 'c d' is not a KBS resource name: up to 128 of "
            "A-Z a-z 0-9 _ - . (not first)",
        ),
        (
            "kbs:///a/b/" + "t" * 129,
            "KBS resource tag '" + "t" * 80 + "...' is not a KBS "
            "resource name: up to 128 of A-Z a-z 0-9 _ - . (not first)",
        ),
        ("kbs://user@kbs/a/b/c", "KBS resource host 'user@kbs' is not a host[:port]"),
        ("kbs://kbs:port/a/b/c", "KBS resource host 'kbs:port' is not a host[:port]"),
        ("kbs://kbs:99999/a/b/c", "KBS resource host 'kbs:99999' is not a host[:port]"),
        ("kbs://kbs:0/a/b/c", "KBS resource host 'kbs:0' is not a host[:port]"),
        ("kbs:///" + "a/" * 300 + "c", "the KBS resource URI is 608 characters, more than 512"),
    ],
)
def test_resource_uris_refused_with_what_to_write(text: str, first_line: str) -> None:
    with pytest.raises(StoreKeyConfigError) as caught:
        KbsResource.parse(text)
    assert str(caught.value) == first_line + "\n" + URI_HINT
    assert isinstance(caught.value, UsageError)  # exit status 2 from the CLI


SEGMENT_FIRST = string.ascii_letters + string.digits + "_-"
segments = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(SEGMENT_FIRST),
    st.text(alphabet=SEGMENT_FIRST + ".", max_size=40),
)


@given(segments, segments, segments)
def test_every_well_formed_resource_round_trips(repo: str, type_: str, tag: str) -> None:
    text = f"kbs:///{repo}/{type_}/{tag}"
    parsed = KbsResource.parse(text)
    assert parsed.segments == (repo, type_, tag)
    assert str(parsed) == text and KbsResource.parse(str(parsed)) == parsed


@given(st.text(max_size=80))
def test_anything_else_parses_to_a_safe_value_or_a_usage_error(tail: str) -> None:
    for text in (tail, "kbs://" + tail, "kbs:///" + tail):
        try:
            parsed = KbsResource.parse(text)
        except StoreKeyConfigError as exc:
            lines = str(exc).splitlines()
            if len(lines) != 2 or lines[1] != URI_HINT:
                raise AssertionError(f"not a two-line refusal: {lines}") from exc
            continue
        assert len(parsed.segments) == 3
        for segment in parsed.segments:
            assert segment and not segment.startswith(".")
            assert set(segment) <= set(SEGMENT_FIRST + ".")
        assert KbsResource.parse(str(parsed)) == parsed


def test_a_resource_cannot_be_built_around_the_parser() -> None:
    with pytest.raises(StoreKeyConfigError, match=r"repository '\.\.'"):
        KbsResource("..", "b", "c")
    with pytest.raises(AttributeError):
        RESOURCE.tag = "2"  # type: ignore[misc]


# -- the CDH URL ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("http://127.0.0.1:8006", "http://127.0.0.1:8006"),
        ("http://127.0.0.1:8006/", "http://127.0.0.1:8006"),
        ("http://127.9.8.7:1", "http://127.9.8.7:1"),
        ("http://[::1]:8006", "http://[::1]:8006"),
        ("http://127.0.0.1", "http://127.0.0.1:80"),
    ],
)
def test_loopback_cdh_urls_are_accepted(text: str, normalised: str) -> None:
    assert check_cdh_url(text) == normalised


@pytest.mark.parametrize(
    ("text", "first_line"),
    [
        (
            "https://127.0.0.1:8006",
            "Confidential Data Hub URL 'https://127.0.0.1:8006' is not "
            "http:// (its REST API serves plain HTTP on loopback, inside the pod VM)",
        ),
        (
            "unix:///run/confidential-containers/cdh.sock",
            "Confidential Data Hub URL "
            "'unix:///run/confidential-containers/cdh.sock' is not http:// (its REST API serves "
            "plain HTTP on loopback, inside the pod VM)",
        ),
        (
            "127.0.0.1:8006",
            "Confidential Data Hub URL '127.0.0.1:8006' is not http:// (its "
            "REST API serves plain HTTP on loopback, inside the pod VM)",
        ),
        (
            "http://localhost:8006",
            "Confidential Data Hub URL 'http://localhost:8006' names a "
            "host, not a loopback address (names resolve through /etc/hosts, which the host "
            "writes)",
        ),
        (
            "http://cdh.kube-system.svc:8006",
            "Confidential Data Hub URL "
            "'http://cdh.kube-system.svc:8006' names a host, not a loopback address (names "
            "resolve through /etc/hosts, which the host writes)",
        ),
        (
            "http://10.0.0.1:8006",
            "Confidential Data Hub URL 'http://10.0.0.1:8006' is not a "
            "loopback address: a key from outside the pod VM could be the host's own",
        ),
        (
            "http://0.0.0.0:8006",
            "Confidential Data Hub URL 'http://0.0.0.0:8006' is not a "
            "loopback address: a key from outside the pod VM could be the host's own",
        ),
        (
            "http://[::ffff:127.0.0.1]:8006",
            "Confidential Data Hub URL "
            "'http://[::ffff:127.0.0.1]:8006' is not a loopback address: a key from outside the "
            "pod VM could be the host's own",
        ),
        (
            "http://u:p@127.0.0.1:8006",
            "Confidential Data Hub URL 'http://u:p@127.0.0.1:8006' carries credentials",
        ),
        (
            "http://127.0.0.1:8006/cdh",
            "Confidential Data Hub URL 'http://127.0.0.1:8006/cdh' "
            "has a path, query or fragment: give only http://address:port",
        ),
        (
            "http://127.0.0.1:8006?x=1",
            "Confidential Data Hub URL 'http://127.0.0.1:8006?x=1' "
            "has a path, query or fragment: give only http://address:port",
        ),
        (
            "http://127.0.0.1:99999",
            "Confidential Data Hub URL 'http://127.0.0.1:99999' is "
            "malformed (Port out of range 0-65535)",
        ),
        ("http://127.0.0.1:0", "Confidential Data Hub URL 'http://127.0.0.1:0' has port 0"),
    ],
)
def test_other_cdh_urls_are_refused(text: str, first_line: str) -> None:
    with pytest.raises(StoreKeyConfigError) as caught:
        check_cdh_url(text)
    assert str(caught.value) == first_line + "\n" + CDH_HINT


def test_a_refused_cdh_url_is_never_contacted() -> None:
    with StandInCdh({}) as cdh, pytest.raises(StoreKeyConfigError, match="names a host"):
        fetch_store_key(RESOURCE, cdh.url.replace("127.0.0.1", "localhost"))
    assert cdh.requests == []


def test_server_config_checks_the_cdh_url_and_needs_a_store_dir() -> None:
    with pytest.raises(StoreKeyConfigError, match="not a loopback address"):
        ServerConfig(cdh_url="http://192.0.2.1:8006")
    with pytest.raises(StoreKeyConfigError) as caught:
        ServerConfig(store_key_resource=RESOURCE)
    assert str(caught.value) == (
        "--store-key-resource needs --store-dir: the key opens a store that replicas share\n"
        "give every replica the same --store-dir (shared storage)"
    )
    config = ServerConfig(store_dir="/tmp/x", store_key_resource=RESOURCE)
    assert config.cdh_url == DEFAULT_CDH_URL
    assert "store_key_resource" not in config.security_relevant()


# -- fetching the key -----------------------------------------------------------------


def expected_store_key(secret: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=STORE_KEY_LABEL)
    return hkdf.derive(secret)


def test_the_store_key_is_derived_from_the_released_resource() -> None:
    with StandInCdh({"blindinfer/store-key/1": SECRET}) as cdh:
        key = fetch_store_key(RESOURCE, cdh.url)
    assert cdh.requests == [("GET", "/cdh/resource/blindinfer/store-key/1")]
    assert key == expected_store_key(SECRET) == derive_store_key(SECRET)
    assert len(key) == 32 and key != SECRET


def test_proxy_settings_in_the_environment_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://192.0.2.1:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with StandInCdh({"blindinfer/store-key/1": SECRET}) as cdh:
        assert fetch_store_key(RESOURCE, cdh.url) == expected_store_key(SECRET)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def refusal(cdh_url: str, *, timeout_s: float = 5.0) -> StoreKeyUnavailableError:
    with pytest.raises(StoreKeyUnavailableError) as caught:
        fetch_store_key(RESOURCE, cdh_url, timeout_s=timeout_s)
    assert isinstance(caught.value, BlindInferError)
    assert len(str(caught.value).splitlines()) == 2
    return caught.value


def refusal_from(answer: bytes | Answer, *, timeout_s: float = 5.0) -> StoreKeyUnavailableError:
    with StandInCdh({"blindinfer/store-key/1": answer}) as cdh:
        error = refusal(cdh.url, timeout_s=timeout_s)
    error.args = (str(error).replace(cdh.url, "CDH"),)
    return error


def test_no_cdh_listening(refused_port: int) -> None:
    error = refusal(f"http://127.0.0.1:{refused_port}")
    assert error.reason == "cdh_unreachable"
    assert str(error) == (
        f"cannot reach the Confidential Data Hub at http://127.0.0.1:{refused_port} for the "
        "store key kbs:///blindinfer/store-key/1: [Errno 111] Connection refused\n"
        "is api-server-rest running in this pod (default 127.0.0.1:8006)? else set --cdh-url"
    )


def test_resource_feature_off_is_404() -> None:
    error = refusal_from(Answer(404, b"Resource Feature Not Enabled"))
    assert error.reason == "cdh_endpoint_not_found"
    assert str(error) == (
        "the Confidential Data Hub at CDH has no resource endpoint (HTTP 404: Resource "
        "Feature Not Enabled)\n"
        "start api-server-rest with --features resource (or all), and check --cdh-url"
    )


def test_key_not_released_is_500_with_the_cdh_text() -> None:
    with StandInCdh({}) as cdh:
        error = refusal(cdh.url)
    assert error.reason == "key_not_released"
    assert str(error) == (
        "the CDH could not obtain kbs:///blindinfer/store-key/1 from the KBS (HTTP 500: "
        "Failed to get resource: offline-fs-kbc: resource not found "
        "/cdh/resource/blindinfer/store-key/1)\n"
        "check that the KBS holds this resource and that its resource policy releases it "
        "to this pod's evidence"
    )


def test_an_error_text_is_cut_to_one_printable_line() -> None:
    error = refusal_from(Answer(500, b"policy\ndenied\x00\x1b[31m" + b"x" * 400))
    line = str(error).splitlines()[0]
    assert line.startswith(
        "the CDH could not obtain kbs:///blindinfer/store-key/1 from the KBS (HTTP 500: "
        "policy denied [31mxxx"
    )
    assert line.endswith("xxx...)") and "\x1b" not in line and "\x00" not in line


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (
            Answer(403, b"Forbidden"),
            "HTTP 403 for the store key kbs:///blindinfer/store-key/1 (Forbidden)",
        ),
        (
            Answer(302, b"", {"Location": "http://192.0.2.1/key"}),
            "HTTP 302 for the store key kbs:///blindinfer/store-key/1 (no body)",
        ),
    ],
)
def test_other_statuses_are_refused_and_redirects_not_followed(answer: Answer, said: str) -> None:
    error = refusal_from(answer)
    assert error.reason == "cdh_unexpected_status"
    assert str(error) == (
        f"the Confidential Data Hub at CDH answered {said}\n"
        "is api-server-rest what listens at --cdh-url?"
    )


def test_a_slow_cdh_times_out() -> None:
    error = refusal_from(Answer(200, SECRET, delay_s=3.0), timeout_s=0.3)
    assert error.reason == "cdh_timeout"
    assert str(error) == (
        "the Confidential Data Hub at CDH did not answer within 0.3 s for the store key "
        "kbs:///blindinfer/store-key/1\n"
        "check that the CDH and the KBS it is configured with are up, then restart"
    )


def test_a_body_that_drips_in_is_bounded_by_the_whole_deadline() -> None:
    # each byte comes well within the read timeout; the whole answer does not
    error = refusal_from(Answer(200, SECRET, drip_s=0.05), timeout_s=0.6)
    assert error.reason == "cdh_timeout"


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_resource_is_refused_unread(chunked: bool) -> None:
    error = refusal_from(Answer(200, b"k" * (1 << 20), chunked=chunked))
    assert error.reason == "secret_too_large"
    assert str(error) == (
        f"the KBS resource kbs:///blindinfer/store-key/1 is more than {MAX_RESOURCE_BYTES} "
        "bytes; the store key must be exactly 32 raw bytes\n" + KEY_FILE_HINT
    )


@pytest.mark.parametrize(
    ("secret", "note"),
    [
        (b"", ""),
        (b"K" * 31, ""),
        (b"K" * 33, ""),
        (b"K" * MAX_RESOURCE_BYTES, ""),
        (base64.b64encode(SECRET), " (it looks like base64 text: store the decoded bytes)"),
        (base64.b64encode(SECRET) + b"\n", " (it looks like base64 text: store the decoded bytes)"),
        (SECRET.hex().encode(), ""),
    ],
)
def test_a_resource_that_is_not_32_raw_bytes_is_refused(secret: bytes, note: str) -> None:
    error = refusal_from(secret)
    assert error.reason == "secret_wrong_size"
    assert str(error) == (
        f"the KBS resource kbs:///blindinfer/store-key/1 is {len(secret)} bytes; the store "
        f"key must be exactly 32 raw bytes{note}\n" + KEY_FILE_HINT
    )
    if secret:  # the secret itself never appears in a message
        assert secret.strip().decode() not in str(error)


def test_a_compressed_answer_is_refused() -> None:
    error = refusal_from(Answer(200, SECRET, {"Content-Encoding": "gzip"}))
    assert error.reason == "cdh_unexpected_status"
    assert str(error) == (
        "the Confidential Data Hub at CDH sent the store key kbs:///blindinfer/store-key/1 "
        "with content encoding 'gzip'\nis api-server-rest what listens at --cdh-url?"
    )


def test_a_connection_that_is_not_http_is_broken() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def garbage() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

        thread = threading.Thread(target=garbage, daemon=True)
        thread.start()
        error = refusal(f"http://127.0.0.1:{port}")
        thread.join(timeout=5)
    assert error.reason == "cdh_broken"
    assert str(error).splitlines()[1] == "is api-server-rest what listens at --cdh-url?"
