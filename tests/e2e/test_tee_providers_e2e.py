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
    policy = blindinfer.Policy.from_dict({"tdx": {"mrtd": ["01" * 48]}})
    with pytest.raises(blindinfer.KeyBindingError, match="does not bind the TLS key"):
        attest(url, policy=policy, now=chosen["verify_at_unix"])
    (inblob,) = _inblobs(fs)  # one fresh entry, written with our binding and nonce
    assert len(inblob) == 64 and inblob[32:] != bytes(32)


def test_real_tdx_evidence_is_authentic_before_binding(
    tdx_server: tuple[str, FakeConfigfs, dict[str, Any]],
) -> None:
    """Authenticity runs first: at a time outside the collateral window it is that error."""
    url, _, chosen = tdx_server
    policy = blindinfer.Policy.from_dict({"tdx": {"mrtd": ["01" * 48]}})
    late = chosen["verify_at_unix"] + 400 * 86400
    with pytest.raises(blindinfer.QuoteVerificationError, match=r"(?i)expired"):
        attest(url, policy=policy, now=late)


def test_real_snp_evidence_not_bound_to_the_server_key_is_refused(
    snp_server: tuple[str, FakeConfigfs, dict[str, Any]],
) -> None:
    url, fs, chosen = snp_server
    policy = blindinfer.Policy.from_dict({"snp": {"measurement": ["01" * 48]}})
    at = parse_time(chosen["verify_at"])
    with pytest.raises(blindinfer.KeyBindingError, match="does not bind the TLS key"):
        attest(url, policy=policy, now=at)
    (inblob,) = _inblobs(fs)  # the provider's probe entry never wrote inblob
    assert len(inblob) == 64
    assert [name.startswith("blindinfer-probe-") for name in fs.created] == [True, False]


def _snp_platform(tmp_path: Path, vcek: bytes, crl_source: Any = None) -> ConfigfsTsmPlatform:
    import uuid

    chosen = case("snp_milan_trustee")
    ask, ark = ask_ark()
    table = cert_table([(uuid.UUID(VCEK), vcek), (uuid.UUID(ASK), ask), (uuid.UUID(ARK), ark)])
    fs = FakeConfigfs("sev_guest", vectors.path(chosen, "evidence").read_bytes(), table)
    return ConfigfsTsmPlatform(tmp_path, collateral=None, crl_source=crl_source, fs=fs)


def test_a_malformed_vcek_is_a_blindinfer_error_from_connect(tmp_path: Path) -> None:
    """A VCEK whose byte 99 breaks a lazily parsed field used to escape as a ValueError."""
    chosen = case("snp_milan_trustee")
    vcek = vectors.path(chosen, "chip_cert").read_bytes()
    broken = vcek[:99] + b"\x00" + vcek[100:]
    policy = blindinfer.Policy.from_dict({"snp": {"measurement": ["11" * 48]}})
    for url in running(_snp_platform(tmp_path, broken)):
        with pytest.raises(blindinfer.QuoteVerificationError, match="malformed certificate"):
            blindinfer.connect(url, policy=policy)
        with pytest.raises(blindinfer.BlindInferError):
            attest(url, policy=policy, now=parse_time(chosen["verify_at"]))


class _ForgedCrl:
    """A CRL source serving a CRL that names ARK-Milan but is signed by another key."""

    def __init__(self) -> None:
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.hazmat.primitives.serialization import Encoding

        from blindinfer.attestation.roots.amd import AMD_PRODUCTS

        ark = x509.load_der_x509_certificate(AMD_PRODUCTS["Milan"].ark_der)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
        self.der = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ark.subject)
            .last_update(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
            .next_update(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
            .sign(key, hashes.SHA384(), rsa_padding=pss)
            .public_bytes(Encoding.DER)
        )
        self.asked = 0

    def crl_for(self, report: bytes) -> bytes:
        self.asked += 1
        return self.der


def test_the_crl_travels_with_snp_evidence_and_a_forged_one_is_refused(tmp_path: Path) -> None:
    from blindinfer.client.client import capture

    chosen = case("snp_milan_trustee")
    source = _ForgedCrl()
    platform = _snp_platform(tmp_path, vectors.path(chosen, "chip_cert").read_bytes(), source)
    policy = blindinfer.Policy.from_dict({"snp": {"measurement": ["11" * 48]}})
    for url in running(platform):
        assert capture(url, timeout=30).evidence.crl == source.der  # it travels, bundles keep it
        with pytest.raises(blindinfer.QuoteVerificationError, match="CRL is not signed by the ARK"):
            attest(url, policy=policy, now=parse_time(chosen["verify_at"]))
    assert source.asked >= 2
