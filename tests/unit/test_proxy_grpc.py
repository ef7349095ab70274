"""The proxy's gRPC side (proxy/grpc_forward.py) without an upstream: which calls it
forwards at all, the metadata it sends on, the refusals it answers itself, and where it
agrees to listen. Forwarding to a real server is tested end to end in
tests/e2e/test_proxy_grpc_e2e.py.

The listener tests run a real proxy (RunningProxy) whose upstream is a closed port: any
call that got past the local checks would have to attest first, and cannot.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

import blindinfer
from blindinfer.cli.proxy import main as proxy_main
from blindinfer.client.grpc_pin import certificate_name
from blindinfer.protocol.oip_grpc.service import METHODS, SERVICE_NAME
from blindinfer.proxy.forward import ProxyConfig, RunningProxy
from blindinfer.proxy.grpc_forward import (
    ALLOWED_METHODS,
    ATTESTATION_ERROR_KEY,
    ERROR_CODE_KEY,
    GrpcListenError,
    is_allowed,
    refusal_status,
    relayed_metadata,
    token_matches,
    upstream_metadata,
)
from blindinfer.proxy.guard import TOKEN_HEADER
from blindinfer.proxy.refusal import refusal
from blindinfer.server.tls import CERTIFICATE_COMMON_NAME, make_tls_identity

POLICY = blindinfer.Policy(
    sgx=blindinfer.SgxPolicy(mrenclave=(b"\x01" * 32,), mrsigner=(b"\x02" * 32,))
)
TOKEN = "a-local-access-token-of-some-length"
API_KEY = "bik_the-proxys-own-key"
METADATA_KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1)
METADATA_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E))


# -- the method allowlist ----------------------------------------------------------------------


def test_the_allowlist_is_exactly_the_services_unary_calls() -> None:
    expected = {
        f"/{SERVICE_NAME}/{name}"
        for name in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
            "RepositoryModelLoad",
            "RepositoryModelUnload",
        )
    }
    assert expected == ALLOWED_METHODS
    assert all(is_allowed(method.path) for method in METHODS)
    for path in (
        f"/{SERVICE_NAME}/ModelStreamInfer",  # a stream: not forwarded
        f"/{SERVICE_NAME}/RepositoryIndex",
        f"/{SERVICE_NAME}/ModelInfer/",
        f"/{SERVICE_NAME.upper()}/ModelInfer",
        f"{SERVICE_NAME}/ModelInfer",
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "",
    ):
        assert not is_allowed(path), path


@given(st.text())
def test_nothing_else_is_allowed(path: str) -> None:
    assert is_allowed(path) == (path in {method.path for method in METHODS})


# -- metadata -----------------------------------------------------------------------------------


def test_upstream_metadata_drops_the_callers_credentials_and_adds_the_proxys_key() -> None:
    inbound: list[tuple[str, str | bytes]] = [
        ("authorization", "Bearer bik_forged"),
        (TOKEN_HEADER, TOKEN),
        ("user-agent", "grpc-python/1.81"),
        ("grpc-accept-encoding", "gzip"),
        ("x-request-id", "7"),
        ("trace-bin", b"\x00\x01"),
    ]
    assert upstream_metadata(inbound, forward_authorization=False, api_key=API_KEY) == [
        ("x-request-id", "7"),
        ("trace-bin", b"\x00\x01"),
        ("authorization", f"Bearer {API_KEY}"),
    ]
    assert upstream_metadata(inbound, forward_authorization=False, api_key=None) == [
        ("x-request-id", "7"),
        ("trace-bin", b"\x00\x01"),
    ]
    assert upstream_metadata(inbound, forward_authorization=True, api_key=API_KEY) == [
        ("x-request-id", "7"),
        ("trace-bin", b"\x00\x01"),
        ("authorization", "Bearer bik_forged"),
    ]
    # forwarding asked for, but the caller sent none: the proxy's key
    assert upstream_metadata([], forward_authorization=True, api_key=API_KEY) == [
        ("authorization", f"Bearer {API_KEY}")
    ]


@given(
    st.lists(st.tuples(METADATA_KEYS, METADATA_VALUES), max_size=12),
    st.booleans(),
)
def test_upstream_metadata_never_carries_the_token_nor_a_foreign_key(
    inbound: list[tuple[str, str]], forward: bool
) -> None:
    inbound = [*inbound, (TOKEN_HEADER, TOKEN)]
    sent = upstream_metadata(inbound, forward_authorization=forward, api_key=API_KEY)
    assert all(key != TOKEN_HEADER for key, _ in sent)
    assert all(not key.startswith(("grpc-", ":")) for key, _ in sent)
    authorizations = [value for key, value in sent if key == "authorization"]
    assert len(authorizations) == 1
    callers = [value for key, value in inbound if key == "authorization"]
    if not forward or not callers:
        assert authorizations == [f"Bearer {API_KEY}"]
    else:
        assert authorizations == callers[:1]


def test_relayed_metadata_keeps_the_servers_codes_only() -> None:
    trailing = [(ERROR_CODE_KEY, "unknown_model"), ("grpc-status", "5"), ("retry-after", "2")]
    assert relayed_metadata(trailing) == [(ERROR_CODE_KEY, "unknown_model"), ("retry-after", "2")]
    assert relayed_metadata(None) == []


def test_the_token_must_be_given_once_and_exactly() -> None:
    assert token_matches([], None)
    assert token_matches([(TOKEN_HEADER, TOKEN)], TOKEN)
    assert not token_matches([], TOKEN)
    assert not token_matches([(TOKEN_HEADER, TOKEN[:-1])], TOKEN)
    assert not token_matches([(TOKEN_HEADER, TOKEN + "x")], TOKEN)
    assert not token_matches([(TOKEN_HEADER, TOKEN), (TOKEN_HEADER, TOKEN)], TOKEN)
    assert not token_matches([(TOKEN_HEADER + "-bin", TOKEN.encode())], TOKEN)


# -- what the upstream tells us ---------------------------------------------------------------


def test_the_target_name_is_the_one_the_servers_certificate_carries() -> None:
    assert certificate_name(make_tls_identity().certificate_der) == CERTIFICATE_COMMON_NAME


def test_refusals_map_to_documented_codes() -> None:
    status, details, trailing = refusal_status(
        refusal(ConnectionRefusedError("refused"), "https://h:1")
    )
    assert status == grpc.StatusCode.UNAVAILABLE
    assert details.startswith("upstream_unavailable: the upstream https://h:1 could not be")
    assert dict(trailing) == {
        ERROR_CODE_KEY: "upstream_unavailable",
        "blindinfer-http-status": "503",
        ATTESTATION_ERROR_KEY: "ConnectionRefusedError",
    }
    status, details, trailing = refusal_status(
        refusal(blindinfer.KeyBindingError("another key"), "https://h:1")
    )
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert details.endswith("nothing was forwarded: KeyBindingError: another key")
    assert dict(trailing)[ERROR_CODE_KEY] == "attestation_failed"
    assert dict(trailing)[ATTESTATION_ERROR_KEY] == "KeyBindingError"


# -- the listener ---------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def unattested() -> Iterator[RunningProxy]:
    """A proxy with a gRPC side whose upstream never answers, with an access token."""
    config = ProxyConfig(
        upstream=f"https://127.0.0.1:{closed_port()}",
        policy=POLICY,
        grpc_listen=("127.0.0.1", 0),
        upstream_grpc_port=closed_port(),
        access_token=TOKEN,
        retry_seconds=0.0,
        timeout=5.0,
    )
    with RunningProxy(config) as running:
        yield running


def call(proxy: RunningProxy, path: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.Call:
    with (
        grpc.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel,
        pytest.raises(grpc.RpcError) as failed,
    ):
        channel.unary_unary(path)(b"", metadata=metadata, timeout=10)
    error = failed.value
    assert isinstance(error, grpc.Call)
    return error


def test_other_methods_are_unimplemented_and_attest_nothing(unattested: RunningProxy) -> None:
    before = unattested.upstream.stats.attestation_failures
    for path in (f"/{SERVICE_NAME}/ModelStreamInfer", "/grpc.health.v1.Health/Check"):
        error = call(unattested, path, ((TOKEN_HEADER, TOKEN),))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert unattested.upstream.stats.attestation_failures == before


def test_without_the_token_nothing_happens(unattested: RunningProxy) -> None:
    stats = unattested.upstream.stats
    before = (stats.attestation_failures, stats.refused_local)
    for metadata in ((), ((TOKEN_HEADER, "wrong-token-of-some-length"),)):
        error = call(unattested, f"/{SERVICE_NAME}/ServerLive", metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN_HEADER in (error.details() or "")
        assert dict(error.trailing_metadata() or ())[ERROR_CODE_KEY] == "proxy_token_required"
    assert (stats.attestation_failures, stats.refused_local) == (before[0], before[1] + 2)


def test_an_unattested_upstream_gets_nothing(unattested: RunningProxy) -> None:
    stats = unattested.upstream.stats
    error = call(unattested, f"/{SERVICE_NAME}/ModelInfer", ((TOKEN_HEADER, TOKEN),))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert (error.details() or "").startswith("upstream_unavailable: ")
    assert "nothing was forwarded" in (error.details() or "")
    trailing = dict(error.trailing_metadata() or ())
    assert trailing[ERROR_CODE_KEY] == "upstream_unavailable"
    assert trailing[ATTESTATION_ERROR_KEY] == "ConnectionFailedError"
    assert stats.forwarded == 0
    assert stats.attestations == 0


def test_a_grpc_port_in_use_stops_the_proxy(unattested: RunningProxy) -> None:
    config = ProxyConfig(
        upstream=unattested.upstream.url,
        policy=POLICY,
        grpc_listen=("127.0.0.1", unattested.grpc_port),
        timeout=2.0,
    )
    with pytest.raises(GrpcListenError, match=r"cannot listen for gRPC on 127\.0\.0\.1:"):
        RunningProxy(config).start()


def test_the_cli_refuses_the_http_port_for_grpc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same port as --listen: both sockets are bound before uvicorn listens, so the
    second bind must fail loudly rather than share the port."""
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[sgx]\nmrenclave = ["{"01" * 32}"]\nmrsigner = ["{"02" * 32}"]\n')
    port = closed_port()
    status = proxy_main(
        [
            "--policy",
            str(policy),
            "--upstream",
            f"https://127.0.0.1:{closed_port()}",
            "--listen",
            f"127.0.0.1:{port}",
            "--grpc-listen",
            f"127.0.0.1:{port}",
            "--start-unattested",
            "--timeout",
            "2",
        ]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert f"--grpc-listen: cannot listen for gRPC on 127.0.0.1:{port}: the port is in use" in error


# -- what the proxy refuses to be started with ---------------------------------------------


def test_no_grpc_side_with_several_replicas() -> None:
    with pytest.raises(ValueError, match="--replicas 1"):
        ProxyConfig(
            upstream="https://127.0.0.1:9924",
            policy=POLICY,
            grpc_listen=("127.0.0.1", 0),
            replicas=2,
        )
    with pytest.raises(ValueError, match="upstream_grpc_port"):
        ProxyConfig(upstream="https://127.0.0.1:9924", policy=POLICY, upstream_grpc_port=0)


@pytest.mark.parametrize("address", ["0.0.0.0:8001", "[::]:8001", "192.0.2.1:8001"])
def test_the_cli_refuses_a_remote_grpc_listener(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = proxy_main(
        [
            "--policy",
            "/nonexistent/policy.toml",  # refused before the policy is read
            "--upstream",
            "https://127.0.0.1:9924",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            address,
        ]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert "refusing to listen for gRPC on" in error
    assert "--allow-remote" in error
