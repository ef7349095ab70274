"""Attestation against a real server process: the happy path and every refusal.

Each refusal must raise its own exception, and no request carrying data may be sent:
where a man in the middle is involved, it records every path it was asked for.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator

import httpx
import pytest

import blindinfer
from blindinfer.client.client import Client, capture, verify_bundle
from blindinfer.server.config import ServerConfig
from blindinfer.server.platforms import simulated_mrenclave
from blindinfer.server.process import ServerProcess, start_server
from support.mitm import Mitm, start_mitm

from .conftest import policy_for

pytestmark = pytest.mark.e2e


def _connect(url: str, policy: blindinfer.Policy, simulation: bool = True) -> blindinfer.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(url, policy=policy, simulation=simulation)


def test_connect_verifies_and_reports_the_server(
    server: ServerProcess, policy: blindinfer.Policy
) -> None:
    with _connect(server.url, policy) as client:
        report = client.attestation
        assert report.simulation is True
        assert report.tcb_status == "UpToDate"
        assert report.advisory_ids == ()
        assert report.mrenclave == simulated_mrenclave(ServerConfig(simulation=True))
        assert report.debug is False
        assert report.isvprodid == 1 and report.isvsvn == 1
        assert report.certificate_der  # pinned for every later request


def test_each_connection_uses_a_fresh_nonce(
    server: ServerProcess, policy: blindinfer.Policy
) -> None:
    with _connect(server.url, policy) as first, _connect(server.url, policy) as second:
        assert first.attestation.nonce != second.attestation.nonce
        assert first.attestation.report_data[:32] == second.attestation.report_data[:32]
        assert first.attestation.report_data[32:] == first.attestation.nonce


def test_simulation_is_warned_about_loudly(
    server: ServerProcess, policy: blindinfer.Policy
) -> None:
    with pytest.warns(blindinfer.SimulationWarning, match="SIMULATION MODE"):
        blindinfer.connect(server.url, policy=policy, simulation=True).close()


def test_simulation_server_refused_without_simulation_flag(
    server: ServerProcess, policy: blindinfer.Policy
) -> None:
    with pytest.raises(blindinfer.SimulationNotAllowedError, match="SIMULATION"):
        blindinfer.connect(server.url, policy=policy)


def test_wrong_mrenclave_gives_a_field_diff(
    server: ServerProcess, policy: blindinfer.Policy
) -> None:
    wrong = dataclasses.replace(policy.sgx, mrenclave=(bytes(32),))
    with pytest.raises(blindinfer.PolicyMismatchError) as caught:
        _connect(server.url, blindinfer.Policy(sgx=wrong))
    (mismatch,) = caught.value.mismatches
    assert mismatch.field == "mrenclave"
    assert mismatch.expected == "00" * 32
    assert mismatch.got == policy.sgx.mrenclave[0].hex()
    assert f"mrenclave: expected {'00' * 32}, got {mismatch.got}" in str(caught.value)


def test_higher_minimum_isvsvn_is_refused(server: ServerProcess, policy: blindinfer.Policy) -> None:
    strict = dataclasses.replace(policy.sgx, min_isvsvn=2)
    with pytest.raises(blindinfer.PolicyMismatchError) as caught:
        _connect(server.url, blindinfer.Policy(sgx=strict))
    assert [(m.field, m.expected, m.got) for m in caught.value.mismatches] == [
        ("isvsvn", ">= 2", "1")
    ]


@pytest.fixture(scope="module")
def debug_server() -> Iterator[ServerProcess]:
    with start_server(["--simulation", "--simulate-debug-enclave"]) as running:
        yield running


def test_debug_enclave_is_refused(debug_server: ServerProcess) -> None:
    policy = policy_for(ServerConfig(simulation=True, simulate_debug_enclave=True))
    with pytest.raises(blindinfer.DebugEnclaveError, match="debug"):
        _connect(debug_server.url, policy)


@pytest.fixture
def mitm(server: ServerProcess) -> Iterator[Mitm]:
    middle = Mitm(upstream=server.url)
    running = start_mitm(middle)
    yield middle
    running.should_exit = True


def test_man_in_the_middle_with_its_own_certificate_is_refused(
    mitm: Mitm, policy: blindinfer.Policy
) -> None:
    with pytest.raises(blindinfer.KeyBindingError, match="TLS key"):
        _connect(mitm.url, policy)
    assert mitm.seen == ["/v2/attestation"]


def test_tampered_quote_is_refused(mitm: Mitm, policy: blindinfer.Policy) -> None:
    mitm.mode = "tamper_quote"
    with pytest.raises(blindinfer.QuoteVerificationError) as caught:
        _connect(mitm.url, policy)
    assert type(caught.value) is blindinfer.QuoteVerificationError
    assert mitm.seen == ["/v2/attestation"]


def test_replayed_evidence_through_a_middleman_is_refused(
    mitm: Mitm, policy: blindinfer.Policy
) -> None:
    mitm.mode = "replay"
    for _ in range(2):  # fresh, then stale: both made for the server's key, not the MITM's
        with pytest.raises(blindinfer.KeyBindingError):
            _connect(mitm.url, policy)
    assert mitm.seen == ["/v2/attestation", "/v2/attestation"]


def test_evidence_for_a_stale_nonce_is_refused(
    server: ServerProcess, policy: blindinfer.Policy
) -> None:
    """Real evidence from the real server, bound to its real key, but for an older nonce."""
    old = capture(server.url)
    new = capture(server.url)
    assert old.tls_certificate_der == new.tls_certificate_der
    stale = dataclasses.replace(new, evidence=old.evidence)
    with pytest.raises(blindinfer.FreshnessError, match="nonce"):
        verify_bundle(stale, policy=policy, simulation=True)
    assert verify_bundle(new, policy=policy, simulation=True).nonce == new.nonce


def test_pinned_client_never_talks_to_another_key(
    server: ServerProcess, mitm: Mitm, policy: blindinfer.Policy
) -> None:
    with _connect(server.url, policy) as genuine:
        redirected = Client(mitm.url, genuine.attestation, timeout=10)
        with (
            pytest.raises(blindinfer.KeyBindingError, match="attested TLS certificate") as caught,
            redirected,
        ):
            redirected.upload_model(b"secret model bytes")
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value.__cause__)
    assert mitm.seen == []


def test_plain_http_urls_are_refused(policy: blindinfer.Policy) -> None:
    with pytest.raises(ValueError, match="https only"):
        blindinfer.connect("http://127.0.0.1:9924", policy=policy)


class _OwnCollateral:
    """Collateral the client fetched itself (here: the simulated PKI's, made anew)."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def collateral_json(self, quote: bytes) -> str:
        from blindinfer.tee.simulation.pki import simulation_pki

        self.asked.append(quote)
        return simulation_pki().collateral(time.time() - 3600).json


def test_client_may_take_collateral_from_its_own_source(
    server: ServerProcess, policy: blindinfer.Policy
) -> None:
    source = _OwnCollateral()
    bundle = capture(server.url, collateral=source)
    assert source.asked == [bundle.evidence.quote]
    served = capture(server.url).evidence.collateral_json
    assert bundle.evidence.collateral_json != served
    assert verify_bundle(bundle, policy=policy, simulation=True).tcb_status == "UpToDate"
