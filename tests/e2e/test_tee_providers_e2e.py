"""A real server whose platform is configfs-tsm over a kernel-like folder serving REAL TDX
and SEV-SNP evidence. The client fetches it over real TLS and verifies it: the evidence is
authentic (real Intel / AMD signatures at the vectors' times) but was not made for this
server's TLS key, so the client refuses it with the key-binding error."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blindinfer
from blindinfer.attestation.offline import parse_time
from blindinfer.client.client import attest
from blindinfer.server.config import ServerConfig
from blindinfer.server.serve import build_server, listening_socket
from blindinfer.tee.configfs_tsm import ConfigfsTsmPlatform
from blindinfer.tee.platform import Platform
from support import vectors
from support.fake_configfs import FakeConfigfs, VectorCollateral, ask_ark, cert_table

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore:Parsed a serial number"),  # AMD chip certs: serial 0
]

VCEK = "63da758d-e664-4564-adc5-f4b93be8accd"
ASK = "4ab7b379-bbac-4fe4-a02f-05aef327c782"
ARK = "c0b406a4-a803-4952-9743-3fb6014cd0ae"


def running(platform: Platform) -> Iterator[str]:
    server = build_server(ServerConfig(platform="tdx"), platform)
    sock = listening_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"https://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


def case(case_id: str) -> dict[str, Any]:
    return vectors.case(case_id)


@pytest.fixture
def tdx_server(tmp_path: Path) -> Iterator[tuple[str, FakeConfigfs, dict[str, Any]]]:
    chosen = case("tdx_v4_gcp_cos113")
    fs = FakeConfigfs("tdx_guest", vectors.path(chosen, "evidence").read_bytes())
    collateral = VectorCollateral(vectors.path(chosen, "collateral").read_text())
    platform = ConfigfsTsmPlatform(tmp_path, collateral=collateral, fs=fs)
    for url in running(platform):
        yield url, fs, chosen


@pytest.fixture
def snp_server(tmp_path: Path) -> Iterator[tuple[str, FakeConfigfs, dict[str, Any]]]:
    import uuid

    chosen = case("snp_milan_trustee")
    ask, ark = ask_ark()
    table = cert_table(
        [
            (uuid.UUID(VCEK), vectors.path(chosen, "chip_cert").read_bytes()),
            (uuid.UUID(ASK), ask),
            (uuid.UUID(ARK), ark),
        ]
    )
    fs = FakeConfigfs("sev_guest", vectors.path(chosen, "evidence").read_bytes(), table)
    platform = ConfigfsTsmPlatform(tmp_path, collateral=None, fs=fs)
    for url in running(platform):
        yield url, fs, chosen


def _inblobs(fs: FakeConfigfs) -> list[bytes]:
    return [entry["inblob"] for entry in fs.removed.values() if "inblob" in entry]


def test_real_tdx_evidence_not_bound_to_the_server_key_is_refused(
    tdx_server: tuple[str, FakeConfigfs, dict[str, Any]],
) -> None:
    url, fs, chosen = tdx_server
    policy = blindinfer.Policy.from_dict({"tdx": {"mrtd": ["00" * 48]}})
    with pytest.raises(blindinfer.KeyBindingError, match="does not bind the TLS key"):
        attest(url, policy=policy, now=chosen["verify_at_unix"])
    (inblob,) = _inblobs(fs)  # one fresh entry, written with our binding and nonce
    assert len(inblob) == 64 and inblob[32:] != bytes(32)


def test_real_tdx_evidence_is_authentic_before_binding(
    tdx_server: tuple[str, FakeConfigfs, dict[str, Any]],
) -> None:
    """Authenticity runs first: at a time outside the collateral window it is that error."""
    url, _, chosen = tdx_server
    policy = blindinfer.Policy.from_dict({"tdx": {"mrtd": ["00" * 48]}})
    late = chosen["verify_at_unix"] + 400 * 86400
    with pytest.raises(blindinfer.QuoteVerificationError, match=r"(?i)expired"):
        attest(url, policy=policy, now=late)


def test_real_snp_evidence_not_bound_to_the_server_key_is_refused(
    snp_server: tuple[str, FakeConfigfs, dict[str, Any]],
) -> None:
    url, fs, chosen = snp_server
    policy = blindinfer.Policy.from_dict({"snp": {"measurement": ["00" * 48]}})
    at = parse_time(chosen["verify_at"])
    with pytest.raises(blindinfer.KeyBindingError, match="does not bind the TLS key"):
        attest(url, policy=policy, now=at)
    (inblob,) = _inblobs(fs)  # the provider's probe entry never wrote inblob
    assert len(inblob) == 64
    assert [name.startswith("blindinfer-probe-") for name in fs.created] == [True, False]
