"""GramineSgxPlatform against a fake /dev/attestation serving a REAL SGX DCAP quote."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import dcap_qvl  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindinfer.tee import gramine
from blindinfer.tee.detect import describe_missing, detect_platform
from blindinfer.tee.gramine import SEALING_INFO, GramineError, GramineSgxPlatform
from support import vectors
from support.vectors import VECTORS

SGX_CASE = "sgx_v3_phala_processor"
SEAL_KEY = bytes(range(0x40, 0x50))


def sgx_case() -> dict[str, Any]:
    return vectors.case(SGX_CASE)


class VectorCollateral:
    """A CollateralSource serving the vector's collateral, recording what it was asked."""

    def __init__(self, case: dict[str, Any]) -> None:
        self.json = (VECTORS / str(case["collateral"])).read_text()
        self.quotes: list[bytes] = []

    def collateral_json(self, quote: bytes) -> str:
        self.quotes.append(quote)
        return self.json


def fake_attestation(tmp_path: Path, quote: bytes, attestation_type: str = "dcap") -> Path:
    """/dev/attestation as Gramine lays it out (files are regular files here)."""
    root = tmp_path / "attestation"
    (root / "keys").mkdir(parents=True)
    (root / "attestation_type").write_text(attestation_type)
    (root / "user_report_data").write_bytes(b"")
    (root / "quote").write_bytes(quote)
    (root / "keys" / "_sgx_mrenclave").write_bytes(SEAL_KEY)
    return root


@pytest.fixture
def setup(
    tmp_path: Path,
) -> tuple[GramineSgxPlatform, Path, bytes, VectorCollateral, dict[str, Any]]:
    case = sgx_case()
    quote = (VECTORS / case["evidence"]).read_bytes()
    root = fake_attestation(tmp_path, quote)
    source = VectorCollateral(case)
    return GramineSgxPlatform(root, collateral=source), root, quote, source, case


def test_writes_exactly_the_report_data_and_returns_the_enclave_quote(setup: Any) -> None:
    platform, root, quote, source, _ = setup
    report_data = bytes(range(64))
    evidence = platform.evidence(report_data)
    assert (root / "user_report_data").read_bytes() == report_data
    assert evidence.kind == "intel-sgx"
    assert evidence.quote == quote
    assert evidence.collateral_json == source.json
    assert source.quotes == [quote]
    assert platform.kind == "gramine-sgx"


def test_served_evidence_verifies_with_dcap_qvl(setup: Any) -> None:
    platform, _, _, _, case = setup
    evidence = platform.evidence(os.urandom(64))
    collateral = dcap_qvl.QuoteCollateralV3.from_json(evidence.collateral_json)
    report = dcap_qvl.verify(evidence.quote, collateral, int(case["verify_at_unix"]))
    assert report.status == case["tcb_status"]


@pytest.mark.parametrize(
    ("content", "phrase"),
    [("none", 'sgx.remote_attestation = "dcap"'), ("epid", "'epid'")],
)
def test_wrong_attestation_type_is_a_clear_error(tmp_path: Path, content: str, phrase: str) -> None:
    root = fake_attestation(tmp_path, b"q", attestation_type=content)
    with pytest.raises(GramineError, match="attestation_type") as info:
        GramineSgxPlatform(root, collateral=VectorCollateral.__new__(VectorCollateral))
    assert phrase in str(info.value)


def test_missing_dev_attestation_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(GramineError, match=r"attestation_type does not exist.*gramine-sgx"):
        GramineSgxPlatform(
            tmp_path / "nothing", collateral=VectorCollateral.__new__(VectorCollateral)
        )


def test_missing_quote_file_is_reported(tmp_path: Path) -> None:
    root = fake_attestation(tmp_path, b"q")
    (root / "quote").unlink()
    with pytest.raises(GramineError, match="quote is missing"):
        GramineSgxPlatform(root, collateral=VectorCollateral.__new__(VectorCollateral))


@pytest.mark.parametrize("size", [0, 32, 63, 65])
def test_report_data_must_be_64_bytes(setup: Any, size: int) -> None:
    platform, root, *_ = setup
    with pytest.raises(ValueError, match="64"):
        platform.evidence(bytes(size))
    assert (root / "user_report_data").read_bytes() == b""


def test_sealing_key_is_hkdf_of_the_mrenclave_key_with_a_purpose(setup: Any) -> None:
    platform, root, *_ = setup
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEALING_INFO).derive(
        SEAL_KEY
    )
    assert platform.sealing_key() == expected
    assert platform.sealing_key() == expected
    assert expected != SEAL_KEY and SEALING_INFO.startswith(b"blindinfer-seal")
    (root / "keys" / "_sgx_mrenclave").write_bytes(bytes(16))
    assert platform.sealing_key() != expected


@pytest.mark.parametrize("size", [0, 15, 17, 32])
def test_sealing_key_of_wrong_size_is_refused(setup: Any, size: int) -> None:
    platform, root, *_ = setup
    (root / "keys" / "_sgx_mrenclave").write_bytes(bytes(size))
    with pytest.raises(GramineError, match=r"16-byte|larger than"):
        platform.sealing_key()


def test_missing_sealing_key_is_a_clear_error(setup: Any) -> None:
    platform, root, *_ = setup
    (root / "keys" / "_sgx_mrenclave").unlink()
    with pytest.raises(GramineError, match="_sgx_mrenclave does not exist"):
        platform.sealing_key()


def test_concurrent_requests_never_interleave_write_and_read(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    platform, *_ = setup
    inside = 0
    most = 0
    guard = threading.Lock()
    real_write, real_read = gramine._write_exact, gramine._read_bounded

    def write(path: Path, data: bytes) -> None:
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        time.sleep(0.002)  # widen the window a missing lock would let others into
        real_write(path, data)

    def read(path: Path, limit: int) -> bytes:
        nonlocal inside
        data = real_read(path, limit)
        if path.name == "quote":
            with guard:
                inside -= 1
        return data

    monkeypatch.setattr(gramine, "_write_exact", write)
    monkeypatch.setattr(gramine, "_read_bounded", read)
    threads = [threading.Thread(target=platform.evidence, args=(os.urandom(64),)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1


def test_detect_finds_gramine_first(tmp_path: Path) -> None:
    root = fake_attestation(tmp_path, b"q")
    tsm = tmp_path / "tsm"
    tsm.mkdir()
    assert detect_platform(gramine_root=root, tsm_root=tsm, dev_root=tmp_path) == "gramine-sgx"
    assert detect_platform(gramine_root=tmp_path / "no", tsm_root=tmp_path / "no") is None
    text = describe_missing(gramine_root=root, tsm_root=tsm)
    assert str(root / "attestation_type") in text and str(tsm) in text
