"""The bounded set of attested keys (replicas) and the evidence exchange on an open connection."""

from __future__ import annotations

import json

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.client.attested_keys import MAX_REPLICAS, AttestedKeys, check_replicas
from blindinfer.client.connection_evidence import EvidenceExchange
from blindinfer.errors import ProtocolError, UsageError
from blindinfer.protocol.evidence import MAX_EVIDENCE_BYTES


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def attestation(certificate: bytes) -> VerifiedAttestation:
    return VerifiedAttestation(
        kind="intel-sgx",
        root="simulation",
        simulation=True,
        tcb_status="UpToDate",
        advisory_ids=(),
        claims={},
        report_data=b"\0" * 64,
        certificate_der=certificate,
        nonce=b"\1" * 32,
        verified_at=0,
    )


def test_a_single_key_set_stays_pinned_to_its_first_key() -> None:
    keys = AttestedKeys(max_keys=1)
    assert keys.admits_another(b"A") is True
    keys.admit(attestation(b"A"))
    assert keys.admits_another(b"A") is True
    assert keys.admits_another(b"B") is False
    assert keys.lookup(b"A") is not None
    assert keys.lookup(b"B") is None


def test_a_replica_set_admits_up_to_its_bound_and_forgets_the_oldest() -> None:
    clock = Clock()
    keys = AttestedKeys(max_keys=2, clock=clock)
    keys.admit(attestation(b"A"))
    clock.now += 1
    keys.admit(attestation(b"B"))
    clock.now += 1
    assert keys.admits_another(b"C") is True
    keys.admit(attestation(b"C"))
    assert len(keys) == 2
    assert keys.lookup(b"A") is None
    assert [k.certificate_der for k in keys.admitted()] == [b"B", b"C"]
    first = keys.first
    assert first is not None and first.certificate_der == b"A"


def test_an_old_attestation_is_dropped_and_must_be_made_again() -> None:
    clock = Clock()
    keys = AttestedKeys(max_keys=3, max_age_seconds=10, clock=clock)
    keys.admit(attestation(b"A"))
    clock.now += 10
    assert keys.lookup(b"A") is not None
    clock.now += 0.5
    assert keys.lookup(b"A") is None
    assert len(keys) == 0
    keys.admit(attestation(b"A"))
    assert keys.lookup(b"A") is not None


def test_readmitting_a_key_renews_it() -> None:
    clock = Clock()
    keys = AttestedKeys(max_keys=2, max_age_seconds=10, clock=clock)
    keys.admit(attestation(b"A"))
    clock.now += 8
    keys.admit(attestation(b"A"))
    clock.now += 8
    assert keys.lookup(b"A") is not None
    assert len(keys) == 1


@pytest.mark.parametrize("bad", [0, -1, MAX_REPLICAS + 1, True, 2.0, "3", None])
def test_replica_bounds_are_checked(bad: object) -> None:
    with pytest.raises(UsageError, match="replicas must be"):
        check_replicas(bad)


def test_max_age_must_be_positive() -> None:
    with pytest.raises(UsageError, match="max_age_seconds must be positive"):
        AttestedKeys(max_keys=2, max_age_seconds=0)


# -- the exchange -----------------------------------------------------------------------------


def _answer(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n".encode() + extra + b"\r\n" + body
    )


def test_the_request_carries_a_fresh_nonce_to_the_attestation_route() -> None:
    exchange = EvidenceExchange("https://h:1", "h:1", nonce=b"\7" * 32)
    server = h11.Connection(h11.SERVER)
    server.receive_data(exchange.request.data)
    head = server.next_event()
    assert isinstance(head, h11.Request)
    assert (head.method, head.target) == (b"POST", b"/v2/attestation")
    assert dict(head.headers)[b"host"] == b"h:1"
    data = server.next_event()
    assert isinstance(data, h11.Data)
    assert json.loads(data.data) == {"nonce": "07" * 32}
    assert exchange.request.nonce == b"\7" * 32
    other = EvidenceExchange("https://h:1", "h:1")
    assert other.request.nonce != EvidenceExchange("https://h:1", "h:1").request.nonce


def test_the_evidence_body_comes_back_whole_even_byte_by_byte() -> None:
    exchange = EvidenceExchange("https://h:1", "h:1")
    answer = _answer(200, b'{"version": 1}')
    results = [exchange.receive(answer[i : i + 1]) for i in range(len(answer))]
    assert results[-1] == b'{"version": 1}'
    assert all(r is None for r in results[:-1])
    assert exchange.reusable is True


def test_a_refusal_is_no_evidence() -> None:
    exchange = EvidenceExchange("https://h:1", "h:1")
    with pytest.raises(ProtocolError, match="answered HTTP 503 for evidence"):
        exchange.receive(_answer(503, b"{}"))


def test_a_close_before_the_evidence_is_an_error() -> None:
    exchange = EvidenceExchange("https://h:1", "h:1")
    assert exchange.receive(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc") is None
    with pytest.raises(ProtocolError, match="closed the connection before its evidence"):
        exchange.receive(b"")


def test_oversized_evidence_is_refused() -> None:
    exchange = EvidenceExchange("https://h:1", "h:1")
    head = f"HTTP/1.1 200 OK\r\ncontent-length: {MAX_EVIDENCE_BYTES + 1}\r\n\r\n".encode()
    assert exchange.receive(head) is None
    with pytest.raises(ProtocolError, match="too large") as refused:
        exchange.receive(b"x" * (MAX_EVIDENCE_BYTES + 1))
    assert refused.value.code == "too_large"


def test_an_answer_asking_to_close_leaves_the_connection_unusable() -> None:
    exchange = EvidenceExchange("https://h:1", "h:1")
    assert exchange.receive(_answer(200, b"{}", b"connection: close\r\n")) == b"{}"
    assert exchange.reusable is False


@given(st.lists(st.binary(max_size=200), max_size=8))
def test_any_bytes_give_evidence_none_or_a_protocol_error(chunks: list[bytes]) -> None:
    exchange = EvidenceExchange("https://h:1", "h:1")
    code = None
    try:
        for chunk in [*chunks, b""]:
            if exchange.receive(chunk) is not None:
                break
    except ProtocolError as exc:
        code = exc.code
    assert code in {None, "bad_answer", "no_evidence", "too_large"}
