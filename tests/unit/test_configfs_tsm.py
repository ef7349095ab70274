"""ConfigfsTsmPlatform against a fake configfs-tsm that behaves like the kernel's and serves
REAL evidence: a TDX quote from GCP and an SEV-SNP report with its VCEK.

`FakeConfigfs` is a `TsmFs` over a real temporary folder: mkdir creates the entry's
attributes (provider, generation 0, outblob, auxblob) the way configfs does, writes to
inblob/privlevel bump `generation`, write-only attributes cannot be read, and rmdir
removes the entry. Tests then look at the bytes left on disk and at what was removed.
"""

from __future__ import annotations

import errno
import struct
import uuid
from pathlib import Path
from typing import Any

import dcap_qvl  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from blindinfer.attestation.intel.pccs import HttpResponse
from blindinfer.errors import QuoteParseError
from blindinfer.tee.configfs_tsm import (
    ConfigfsTsmPlatform,
    KdsVcekSource,
    OsTsmFs,
    SealingKeyUnavailableError,
    TsmError,
    parse_cert_table,
    probe_provider,
)
from blindinfer.tee.detect import detect_platform
from support import vectors
from support.fake_configfs import FakeConfigfs, VectorCollateral, ask_ark, cert_table
from support.vectors import VECTORS

pytestmark = pytest.mark.filterwarnings(
    "ignore:Parsed a serial number:cryptography.utils.CryptographyDeprecationWarning"
)  # AMD chip certificates carry serial number 0 (see the vectors' README)

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")


def manifest_case(case_id: str) -> dict[str, Any]:
    return vectors.case(case_id)


def vector(rel: str) -> bytes:
    return (VECTORS / rel).read_bytes()


@pytest.fixture
def tdx(tmp_path: Path) -> tuple[ConfigfsTsmPlatform, FakeConfigfs, Path, bytes, dict[str, Any]]:
    case = manifest_case("tdx_v4_gcp_cos113")
    quote = vector(case["evidence"])
    fs = FakeConfigfs("tdx_guest", quote)
    collateral = VectorCollateral((VECTORS / case["collateral"]).read_text())
    return ConfigfsTsmPlatform(tmp_path, collateral=collateral, fs=fs), fs, tmp_path, quote, case


def snp_platform(
    tmp_path: Path, auxblob: bytes | None, **kwargs: Any
) -> tuple[ConfigfsTsmPlatform, FakeConfigfs]:
    fs = FakeConfigfs("sev_guest", vector("files/trustee/test-report.bin"), auxblob)
    return ConfigfsTsmPlatform(tmp_path, collateral=None, fs=fs, **kwargs), fs


# -- TDX ------------------------------------------------------------------------------


def test_tdx_writes_exactly_the_report_data_and_returns_the_kernel_quote(tdx: Any) -> None:
    platform, fs, root, quote, _ = tdx
    report_data = bytes(range(100, 164))
    evidence = platform.evidence(report_data)
    request = fs.created[-1]
    assert fs.removed[request]["inblob"] == report_data
    assert evidence.quote == quote
    assert evidence.kind == "intel-tdx"
    assert evidence.certificates == ()
    assert platform.kind == "tdx" and platform.provider == "tdx_guest"
    assert list(root.iterdir()) == []  # every entry, probe included, was removed


def test_tdx_evidence_verifies_with_dcap_qvl(tdx: Any) -> None:
    platform, _, _, _, case = tdx
    evidence = platform.evidence(bytes(range(64)))
    collateral = dcap_qvl.QuoteCollateralV3.from_json(evidence.collateral_json)
    report = dcap_qvl.verify(evidence.quote, collateral, int(case["verify_at_unix"]))
    assert report.status == case["tcb_status"]


def test_each_request_uses_a_new_entry(tdx: Any) -> None:
    platform, fs, root, _, _ = tdx
    for _ in range(5):
        platform.evidence(bytes(64))
    assert len(fs.created) == 6  # the provider probe, then one per request
    assert len(set(fs.created)) == 6
    assert all(name.startswith("blindinfer-") for name in fs.created)
    assert list(root.iterdir()) == []


def test_probe_never_writes_inblob(tdx: Any) -> None:
    _, fs, _, _, _ = tdx
    probe = fs.created[0]
    assert "inblob" not in fs.removed[probe]
    assert fs.removed[probe]["generation"] == b"0\n"


def test_generation_mismatch_is_retried_with_a_fresh_entry(tdx: Any) -> None:
    platform, fs, root, quote, _ = tdx
    fs.interfere = 1
    before = len(fs.created)
    assert platform.evidence(bytes(64)).quote == quote
    assert len(fs.created) == before + 2
    assert list(root.iterdir()) == []


def test_persistent_generation_mismatch_is_an_error(tdx: Any) -> None:
    platform, fs, root, _, _ = tdx
    fs.interfere = 100
    with pytest.raises(TsmError, match="generation mismatch"):
        platform.evidence(bytes(64))
    assert list(root.iterdir()) == []


def test_privlevel_is_written_and_counted_in_the_generation(tmp_path: Path) -> None:
    platform, fs = snp_platform(
        tmp_path, cert_table([(VCEK_GUID, vector("files/trustee/test-vcek.der"))]), privlevel=2
    )
    platform.evidence(bytes(64))
    files = fs.removed[fs.created[-1]]
    assert files["privlevel"] == b"2\n"
    assert files["generation"] == b"2\n"


@pytest.mark.parametrize("size", [0, 63, 65])
def test_report_data_must_be_64_bytes(tdx: Any, size: int) -> None:
    platform, fs, _, _, _ = tdx
    with pytest.raises(ValueError, match="64"):
        platform.evidence(bytes(size))
    assert len(fs.created) == 1


def test_tdx_requires_collateral(tmp_path: Path) -> None:
    with pytest.raises(TsmError, match="PCCS"):
        ConfigfsTsmPlatform(tmp_path, collateral=None, fs=FakeConfigfs("tdx_guest", b"q"))


def test_unknown_provider_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TsmError, match="'arm_cca_guest' is not supported"):
        ConfigfsTsmPlatform(tmp_path, collateral=None, fs=FakeConfigfs("arm_cca_guest", b"q"))


def test_oversized_tdx_quote_is_a_cwt_error(tmp_path: Path) -> None:
    fs = FakeConfigfs("tdx_guest", bytes(9000))
    platform = ConfigfsTsmPlatform(tmp_path, collateral=VectorCollateral(""), fs=fs)
    with pytest.raises(TsmError, match="CWT"):
        platform.evidence(bytes(64))


def test_sealing_keys_are_not_available_with_clear_reasons(tdx: Any, tmp_path: Path) -> None:
    platform = tdx[0]
    todo = "configure --store-key-resource kbs:///REPO/TYPE/TAG"
    with pytest.raises(SealingKeyUnavailableError, match="key broker") as tdx_refusal:
        platform.sealing_key()
    snp, _ = snp_platform(tmp_path / "snp", None, provider="sev_guest")
    with pytest.raises(SealingKeyUnavailableError, match="/dev/sev-guest") as snp_refusal:
        snp.sealing_key()
    for refusal in (tdx_refusal, snp_refusal):
        assert todo in str(refusal.value)
        assert "not implemented" not in str(refusal.value)


# -- SEV-SNP --------------------------------------------------------------------------


def verify_snp_signature(report: bytes, vcek_der: bytes) -> None:
    """ECDSA P-384 over report[0:0x2A0]; r and s are 72-byte little-endian at 0x2A0."""
    r = int.from_bytes(report[0x2A0 : 0x2A0 + 72], "little")
    s = int.from_bytes(report[0x2E8 : 0x2E8 + 72], "little")
    key = x509.load_der_x509_certificate(vcek_der).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(encode_dss_signature(r, s), report[:0x2A0], ec.ECDSA(hashes.SHA384()))


def test_snp_returns_the_report_and_the_certificates_from_auxblob(tmp_path: Path) -> None:
    vcek = vector("files/trustee/test-vcek.der")
    ask, ark = ask_ark()
    auxblob = cert_table([(ARK_GUID, ark), (VCEK_GUID, vcek), (ASK_GUID, ask)], pad_to=16384)
    platform, fs = snp_platform(tmp_path, auxblob)
    report_data = bytes(range(64, 128))
    evidence = platform.evidence(report_data)
    assert fs.removed[fs.created[-1]]["inblob"] == report_data
    assert evidence.kind == "amd-snp" and platform.kind == "snp"
    assert evidence.quote == vector("files/trustee/test-report.bin")
    assert evidence.collateral_json == ""
    assert evidence.certificates == (("vcek", vcek), ("ask", ask), ("ark", ark))
    verify_snp_signature(evidence.quote, dict(evidence.certificates)["vcek"])
    assert list(tmp_path.iterdir()) == []


def test_snp_without_certificates_and_without_kds_is_a_clear_error(tmp_path: Path) -> None:
    platform, _ = snp_platform(tmp_path, bytes(4096))
    with pytest.raises(TsmError, match=r"no VCEK in the certificate table.*--kds-url"):
        platform.evidence(bytes(64))
    assert list(tmp_path.iterdir()) == []


def test_snp_without_certificates_fetches_the_vcek_from_kds(tmp_path: Path) -> None:
    vcek = vector("files/trustee/test-vcek.der")
    ask, ark = ask_ark()
    pem = b"".join(x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM) for d in (ask, ark))
    # The URL KDS would serve this VCEK at, from the VCEK's own extensions (AMD OIDs).
    cert = x509.load_der_x509_certificate(vcek)

    def ext(oid: str) -> bytes:
        value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
        assert isinstance(value, x509.UnrecognizedExtension)
        return value.value

    def spl(n: int) -> str:
        return f"{ext(f'1.3.6.1.4.1.3704.1.3.{n}')[-1]:02d}"

    hwid = ext("1.3.6.1.4.1.3704.1.4").hex()
    vcek_url = (
        f"https://kds.test/vcek/v1/Milan/{hwid}?blSPL={spl(1)}&teeSPL={spl(2)}"
        f"&snpSPL={spl(3)}&ucodeSPL={spl(8)}"
    )
    served = {
        vcek_url: HttpResponse(200, {}, vcek),
        "https://kds.test/vcek/v1/Milan/cert_chain": HttpResponse(200, {}, pem),
    }
    fetched: list[str] = []

    def fetch(url: str) -> HttpResponse:
        fetched.append(url)
        return served.get(url, HttpResponse(404, {}, b""))

    kds = KdsVcekSource("https://kds.test/", product="Milan", fetch=fetch)
    platform, _ = snp_platform(tmp_path, b"", vcek_source=kds)
    evidence = platform.evidence(bytes(64))
    assert evidence.certificates == (("vcek", vcek), ("ask", ask), ("ark", ark))
    verify_snp_signature(evidence.quote, vcek)
    platform.evidence(bytes(64))
    assert fetched == [vcek_url, "https://kds.test/vcek/v1/Milan/cert_chain"]  # cached


def test_kds_needs_a_product_for_v2_reports() -> None:
    report = vector("files/trustee/test-report.bin")
    with pytest.raises(TsmError, match="Milan/Genoa/Turin"):
        KdsVcekSource("https://kds.test").vcek_url(report)


def test_vlek_signed_report_needs_the_vlek_from_the_host(tmp_path: Path) -> None:
    report = bytearray(vector("files/trustee/test-report.bin"))
    struct.pack_into("<I", report, 0x48, 1 << 2)  # SIGNING_KEY = VLEK
    fs = FakeConfigfs("sev_guest", bytes(report), cert_table([(VCEK_GUID, b"x")]))
    platform = ConfigfsTsmPlatform(tmp_path, collateral=None, fs=fs)
    with pytest.raises(TsmError, match="VLEK"):
        platform.evidence(bytes(64))
    fs.auxblob = cert_table([(VLEK_GUID, b"vlek-der")])
    assert platform.evidence(bytes(64)).certificates == (("vlek", b"vlek-der"),)


# -- the certificate table ------------------------------------------------------------


def test_cert_table_skips_unknown_guids_and_accepts_empty_tables() -> None:
    other = uuid.UUID("11111111-2222-3333-4444-555555555555")
    assert parse_cert_table(cert_table([(other, b"x"), (VCEK_GUID, b"v")])) == {"vcek": b"v"}
    assert parse_cert_table(b"") == {}
    assert parse_cert_table(bytes(24)) == {}
    assert parse_cert_table(bytes(4096)) == {}


def test_cert_table_guid_byte_order_is_rfc4122() -> None:
    # A GUID stored in the mixed-endian (EFI) layout must not be taken for the VCEK.
    swapped = cert_table([(uuid.UUID(bytes=VCEK_GUID.bytes_le), b"v")])
    assert parse_cert_table(swapped) == {}


@pytest.mark.parametrize(
    ("blob", "phrase"),
    [
        (VCEK_GUID.bytes + struct.pack("<II", 48, 8), "not terminated"),
        (VCEK_GUID.bytes + struct.pack("<II", 48, 8) + bytes(24), "outside"),
        (
            VCEK_GUID.bytes + struct.pack("<II", 8, 8) + bytes(24) + bytes(8),
            "inside the table header",
        ),
        (VCEK_GUID.bytes + struct.pack("<II", 48, 0) + bytes(24) + bytes(8), "outside"),
        (VCEK_GUID.bytes + struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF) + bytes(24), "outside"),
        (cert_table([(VCEK_GUID, b"a"), (VCEK_GUID, b"b")]), "twice"),
        (bytes(10), "not terminated"),
        ((ASK_GUID.bytes + struct.pack("<II", 5000, 1)) * 70 + bytes(24), "entries"),
    ],
)
def test_cert_table_is_bounds_checked(blob: bytes, phrase: str) -> None:
    with pytest.raises(QuoteParseError, match=phrase):
        parse_cert_table(blob)


@given(st.binary(max_size=512))
def test_cert_table_parser_raises_only_quote_parse_errors(blob: bytes) -> None:
    try:
        certs = parse_cert_table(blob)
    except QuoteParseError:
        return
    assert set(certs) <= {"vcek", "vlek", "ask", "ark"}
    assert all(der in blob for der in certs.values())


# -- the real filesystem path and detection -------------------------------------------


def test_missing_configfs_tsm_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TsmError, match=r"does not exist.*Linux >= 6.7"):
        probe_provider(tmp_path / "tsm" / "report")


def test_no_registered_provider_is_a_clear_error(tmp_path: Path) -> None:
    class NoProvider(OsTsmFs):
        def make_entry(self, root: Path, name: str) -> Path:
            raise OSError(errno.ENXIO, "No such device or address")

    with pytest.raises(TsmError, match="no TSM provider is registered"):
        probe_provider(tmp_path, fs=NoProvider())


def test_os_fs_creates_and_removes_entries(tmp_path: Path) -> None:
    fs = OsTsmFs()
    entry = fs.make_entry(tmp_path, "blindinfer-x")
    assert entry.is_dir()
    (entry / "inblob").touch()  # configfs creates the attributes; a plain folder does not
    fs.write(entry / "inblob", b"abc")
    assert fs.read(entry / "inblob", 3) == b"abc"
    with pytest.raises(TsmError, match="larger"):
        fs.read(entry / "inblob", 2)
    (entry / "inblob").unlink()
    fs.remove_entry(entry)
    assert list(tmp_path.iterdir()) == []


def test_detect_tdx_and_snp(tmp_path: Path) -> None:
    tsm, dev = tmp_path / "tsm", tmp_path / "dev"
    tsm.mkdir()
    dev.mkdir()
    none = tmp_path / "no-gramine"
    (dev / "tdx_guest").touch()
    assert detect_platform(gramine_root=none, tsm_root=tsm, dev_root=dev) == "tdx"
    (dev / "tdx_guest").unlink()
    (dev / "sev-guest").touch()
    assert detect_platform(gramine_root=none, tsm_root=tsm, dev_root=dev) == "snp"
    (dev / "sev-guest").unlink()
    fs = FakeConfigfs("sev_guest", b"")
    assert detect_platform(gramine_root=none, tsm_root=tsm, dev_root=dev, fs=fs) == "snp"
    assert "inblob" not in fs.removed[fs.created[0]]
    assert list(tsm.iterdir()) == []
    assert detect_platform(gramine_root=none, tsm_root=tsm, dev_root=dev, probe=False) is None
    assert detect_platform(gramine_root=none, tsm_root=tmp_path / "absent", dev_root=dev) is None


def _amd_like_crl(next_update_hours: int) -> bytes:
    """A CRL shaped like KDS's (issuer ARK-Milan); its signature is not AMD's (the client
    checks that, see test_snp_verify): the server only fetches, parses and caches it."""
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric import rsa

    now = dt.datetime.now(dt.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "ARK-Milan")])
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(now - dt.timedelta(days=1))
        .next_update(now + dt.timedelta(hours=next_update_hours))
        .sign(key, hashes.SHA384())
        .public_bytes(Encoding.DER)
    )


def test_kds_crl_travels_with_snp_evidence_cached_by_kind(tmp_path: Path) -> None:
    crl = _amd_like_crl(7 * 24)
    fetched: list[str] = []

    def fetch(url: str) -> HttpResponse:
        fetched.append(url)
        return HttpResponse(200, {}, crl) if url.endswith("/crl") else HttpResponse(404, {}, b"")

    kds = KdsVcekSource("https://kds.test/", product="Milan", fetch=fetch)
    report = bytearray(vector("files/trustee/test-report.bin"))
    assert kds.crl_url(bytes(report)) == "https://kds.test/vcek/v1/Milan/crl"
    struct.pack_into("<I", report, 0x48, 1 << 2)  # SIGNING_KEY = VLEK
    assert kds.crl_url(bytes(report)) == "https://kds.test/vlek/v1/Milan/crl"
    table = cert_table([(VCEK_GUID, vector("files/trustee/test-vcek.der"))])
    fs = FakeConfigfs("sev_guest", vector("files/trustee/test-report.bin"), table)
    platform = ConfigfsTsmPlatform(tmp_path, collateral=None, crl_source=kds, fs=fs)
    assert platform.evidence(bytes(64)).crl == crl
    assert platform.evidence(bytes(64)).crl == crl
    assert fetched == ["https://kds.test/vcek/v1/Milan/crl"]  # cached until near nextUpdate


def test_kds_crl_outage_serves_the_cached_crl_then_none(tmp_path: Path) -> None:
    crl = _amd_like_crl(12)  # inside the 1-day refresh margin: every call tries KDS again
    up = [True]

    def fetch(url: str) -> HttpResponse:
        return HttpResponse(200, {}, crl) if up[0] else HttpResponse(503, {}, b"")

    kds = KdsVcekSource("https://kds.test/", product="Milan", fetch=fetch)
    table = cert_table([(VCEK_GUID, vector("files/trustee/test-vcek.der"))])
    fs = FakeConfigfs("sev_guest", vector("files/trustee/test-report.bin"), table)
    platform = ConfigfsTsmPlatform(tmp_path, collateral=None, crl_source=kds, fs=fs)
    assert platform.evidence(bytes(64)).crl == crl
    up[0] = False
    assert platform.evidence(bytes(64)).crl == crl  # still current: served from the cache
    garbage = KdsVcekSource(
        "https://kds.test/", product="Milan", fetch=lambda u: HttpResponse(200, {}, b"x")
    )
    assert (
        ConfigfsTsmPlatform(tmp_path, collateral=None, crl_source=garbage, fs=fs)
        .evidence(bytes(64))
        .crl
        == b""
    )  # the client then refuses unless its policy allows a missing CRL
