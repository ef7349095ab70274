"""verify_snp against real AMD evidence that this project did not make (every amd-sev-snp
case of the shared manifest, plus trustee's real VLEK report), the pinned AMD roots, and a
fake AMD PKI (own RSA ARK/ASK/ASVK, own ECDSA VCEK/VLEK) that signs reports so that each
check after the chain (chip ID, TCB, key kind, CRLs) is exercised with valid signatures."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import warnings
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from blindinfer.attestation.roots.amd import AMD_PRODUCTS, AmdProductRoots
from blindinfer.attestation.snp.policy import SnpPolicy, TcbMinimum
from blindinfer.attestation.snp.report import (
    GuestPolicy,
    SnpReport,
    TcbVersion,
    parse_snp_report,
)
from blindinfer.attestation.snp.verify import verify_snp
from blindinfer.errors import Mismatch, PolicyError, QuoteParseError, QuoteVerificationError
from support import vectors
from support.vectors import VECTORS

MILAN_CHAIN = VECTORS / "files" / "go-sev-guest" / "ask_ark_milan.pem"
GOSEV_REPORT = VECTORS / "files" / "go-sev-guest" / "attestation.bin"
GOSEV_VCEK = VECTORS / "files" / "go-sev-guest" / "vcek.testcer"
TRUSTEE_REPORT = VECTORS / "files" / "trustee" / "test-report.bin"
TRUSTEE_VCEK = VECTORS / "files" / "trustee" / "test-vcek.der"
GOSEV_AT = dt.datetime(2022, 9, 25, tzinfo=dt.UTC)
TRUSTEE_AT = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

# The reason each negative manifest case is refused with. neg_snp_wrong_vcek's note says
# "signature fails": that certificate's own signature does not verify with AMD's Milan ASK
# either, so the chain check (step 6) refuses it before the report signature is tried.
EXPECTED_REASONS = {"neg_snp_wrong_vcek": "the VCEK is not signed by 'SEV-Milan'"}

# A real VLEK-signed report (version 3, Milan, AWS) and its VLEK certificate, from
# github.com/confidential-containers/trustee @78962cd deps/verifier/test_data/snp/
# test-vlek-report.bin (sha256 decdab94...) and test-vlek.der (sha256 296a7c99...).
# The VLEK is valid 2024-12-10 .. 2025-12-10.
VLEK_REPORT_B64 = (
    "AwAAAAAAAAAAAAMAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAQAAAAEAAAAEAAAAAAAY3CcA"
    "AAAAAAAABAAAAAAAAACBl3C35upt+N2P1N0Uawc8C/TzzlsJd+ysSG46Be0b1U4qesH10coC59fV759zuFdP2TWe"
    "OkgNdBpEeOinvCfKiSLrvdAOwsVB82pueoKodzp6zLRR7We8lOdA2+ksk8Toya+Ff1zutaST3ypXDXvwAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABi4E+6cAr9k7Og"
    "zAZJtjPuNlh/qKjC612bfNe8X0uwV///////////////////////////////////////////BAAAAAAAGNkZAQEA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAABAAAAAAAGNsdNwEAHTcBAAQAAAAAABjbAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAvFaI8TstPfb++SVVXOrPn+MdyUxetAFOB/orvi8UrpAhO/DlhEFvD9+cIu58lERfAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAA4Ps5eob60WvCvJHx5z5BQLeKOom5uxwRuUvbN1P5zV0mz84THFb0GOFKwubNC8TC"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)
VLEK_CERT_B64 = (
    "MIIFIzCCAtegAwIBAgIBADBBBgkqhkiG9w0BAQowNKAPMA0GCWCGSAFlAwQCAgUAoRwwGgYJKoZIhvcNAQEIMA0G"
    "CWCGSAFlAwQCAgUAogMCATAwgYAxFDASBgNVBAsMC0VuZ2luZWVyaW5nMQswCQYDVQQGEwJVUzEUMBIGA1UEBwwL"
    "U2FudGEgQ2xhcmExCzAJBgNVBAgMAkNBMR8wHQYDVQQKDBZBZHZhbmNlZCBNaWNybyBEZXZpY2VzMRcwFQYDVQQD"
    "DA5TRVYtVkxFSy1NaWxhbjAeFw0yNDEyMTAyMjE0MjFaFw0yNTEyMTAyMjE0MjFaMHoxFDASBgNVBAsMC0VuZ2lu"
    "ZWVyaW5nMQswCQYDVQQGEwJVUzEUMBIGA1UEBwwLU2FudGEgQ2xhcmExCzAJBgNVBAgMAkNBMR8wHQYDVQQKDBZB"
    "ZHZhbmNlZCBNaWNybyBEZXZpY2VzMREwDwYDVQQDDAhTRVYtVkxFSzB2MBAGByqGSM49AgEGBSuBBAAiA2IABFN1"
    "UuIT60plrJQ8/t4JhUrNJCvZKd0QOHglKJZrtXDDuklmXlRUwlUeC2l5zxfSjqgrNsrK4jKWXVR2L1d/sKpWEtba"
    "V7BZti3uSKlV792f2EUXcAb1uIqdw5l6nmaxPqOB8jCB7zAQBgkrBgEEAZx4AQEEAwIBADAUBgkrBgEEAZx4AQIE"
    "BxYFTWlsYW4wEQYKKwYBBAGceAEDAQQDAgEEMBEGCisGAQQBnHgBAwIEAwIBADARBgorBgEEAZx4AQMEBAMCAQAw"
    "EQYKKwYBBAGceAEDBQQDAgEAMBEGCisGAQQBnHgBAwYEAwIBADARBgorBgEEAZx4AQMHBAMCAQAwEQYKKwYBBAGc"
    "eAEDAwQDAgEYMBIGCisGAQQBnHgBAwgEBAICANkwLAYJKwYBBAGceAEFBB8WHUNOPWNjLXVzLWVhc3QtMi5hbWF6"
    "b25hd3MuY29tMEEGCSqGSIb3DQEBCjA0oA8wDQYJYIZIAWUDBAICBQChHDAaBgkqhkiG9w0BAQgwDQYJYIZIAWUD"
    "BAICBQCiAwIBMAOCAgEAVuUTs8xVE+LITqRwHdehRaDzYfH9TsUzvwDgzjCBoPjzDvrkITkkyji3CfIoVk3pKg1j"
    "VQx4vum94oQE7bLPERQluEBsJ9vMHzjq46JrAnKP60MM40uSGX5PGowJD/VHQKOil5DXA2LEtgNagWv3JxKHL8FJ"
    "mkesd+wH41dVGbRN2pexS/o+qVreF7BcXwK3NfiqVUyAydZddETf8KmdtcaYytvUzDR7HnwwYXjLmvswPan9cHPN"
    "GGbw77bdv1C8jZpYcxS0y+MJxpnz8ghLBV23iFMBOjEnsZ5KSJwTR208ktQH9f/a3Z3s537itoUlcbLU8xl0Zd7R"
    "ZoITQDSAXegY/i/MEhC3YXqM97nd+QT7Bf9NKZkIHqjASYVxphE5CNfXSqEMynwf3kd0YuWqGnfr4f9qr0gjHGsP"
    "bKnldUXP3tiSF/0zyIpGJJZHsfKBGzQfUkiUr+n45Faw1ZD512UVQsbw5I8gg07nQCnywuo9T7J02zLqQ31DCzR0"
    "hwJowM7oBazTDjyH9IQvanUxZoGPAXICuQYX+E1ITh/xJol059iP4t0iXMskOWTWbKzyxrNvyIvCNMlS+8gkKruO"
    "q+cWuyv7swgavd52tmlZHqh+ta1gaNu8x3Ldw7SHD/L3KfxlJp1os1i/lm5X2Nip1MF8kUGeD0CMadF35JDQkaY="
)
VLEK_REPORT = base64.b64decode("".join(VLEK_REPORT_B64))
VLEK_CERT = base64.b64decode("".join(VLEK_CERT_B64))
VLEK_AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


def _manifest_cases() -> list[Any]:
    return vectors.case_params("amd-sev-snp")


def _case_inputs(case: dict[str, Any]) -> tuple[bytes, bytes, bytes, dt.datetime]:
    raw = (VECTORS / str(case["evidence"])).read_bytes()
    offset = int(case["evidence_offset"])
    report = parse_snp_report(raw, offset=offset).to_bytes()
    chip = (VECTORS / str(case["chip_cert"])).read_bytes()
    chain = (VECTORS / str(case["ask_ark_chain"])).read_bytes()
    return report, chip, chain, dt.datetime.fromisoformat(str(case["verify_at"]))


def test_manifest_has_the_expected_snp_cases() -> None:
    ids = set(vectors.case_ids("amd-sev-snp"))
    assert {"snp_milan_gosevguest_debug_guest", "snp_milan_trustee", "neg_snp_wrong_vcek"} <= ids


@pytest.mark.parametrize("case", _manifest_cases())
def test_amd_sev_snp_vector(case: dict[str, Any]) -> None:
    report, chip, chain, at = _case_inputs(case)
    if case["expect"] == "ok":
        verified = verify_snp(report, chip, chain=chain, now=at)
        assert verified.product == "Milan"
        assert verified.key_kind == "vcek"
        assert verified.report.to_bytes() == report
    else:
        assert case["expect"] == "err"
        with pytest.raises(QuoteVerificationError) as info:
            verify_snp(report, chip, chain=chain, now=at)
        assert EXPECTED_REASONS[case["id"]] in str(info.value)


def test_debug_guest_verifies_but_the_default_policy_refuses_it() -> None:
    verified = verify_snp(
        GOSEV_REPORT.read_bytes(),
        GOSEV_VCEK.read_bytes(),
        chain=MILAN_CHAIN.read_bytes(),
        now=GOSEV_AT,
    )
    assert SnpPolicy().validate(verified.report) == [
        Mismatch(
            "snp.allow_debug",
            "a guest policy without DEBUG (bit 19 clear)",
            "DEBUG allowed (policy 0xb0000)",
        )
    ]
    with pytest.raises(PolicyError, match=r"snp\.allow_debug = true is not supported"):
        SnpPolicy(allow_debug=True)  # no policy can accept a guest the host can debug


def test_trustee_report_passes_the_default_policy() -> None:
    verified = verify_snp(
        TRUSTEE_REPORT.read_bytes(), TRUSTEE_VCEK.read_bytes(), now=int(TRUSTEE_AT.timestamp())
    )  # no chain supplied: the pinned ASK and ARK are used
    assert verified.report.reported_tcb.describe().startswith("bootloader=3 tee=0 snp=8")
    # its TCB (2022-era Milan firmware) is below today's floor: accepted only with an
    # explicit, lower floor (tests/unit/test_snp_revocation.py shows the default refusing it)
    old = TcbMinimum(bootloader=3, tee=0, snp=8, microcode=115)
    policy = SnpPolicy(min_reported_tcb=old)
    assert policy.validate(verified.report, product=verified.product) == []


def test_pem_chip_certificate_is_accepted() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pem = x509.load_der_x509_certificate(TRUSTEE_VCEK.read_bytes()).public_bytes(Encoding.PEM)
    assert verify_snp(TRUSTEE_REPORT.read_bytes(), pem, now=TRUSTEE_AT).product == "Milan"


def test_serial_zero_warning_does_not_escape(recwarn: pytest.WarningsRecorder) -> None:
    verify_snp(TRUSTEE_REPORT.read_bytes(), TRUSTEE_VCEK.read_bytes(), now=TRUSTEE_AT)
    assert not [w for w in recwarn if "serial" in str(w.message).lower()]


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize(
    "offset",
    [0x050, 0x090, 0x1A0 + 63, 0x1F0, 0x2A0, 0x2E8 + 10],
    ids=["report_data", "measurement", "chip_id", "launch_tcb", "sig-r", "sig-s"],
)
def test_flipped_report_bytes_fail_the_signature(offset: int) -> None:
    report = _flip(TRUSTEE_REPORT.read_bytes(), offset)
    with pytest.raises(
        QuoteVerificationError, match="report signature does not verify with the VCEK"
    ):
        verify_snp(report, TRUSTEE_VCEK.read_bytes(), now=TRUSTEE_AT)


def test_another_chips_vcek_fails_the_report_signature() -> None:
    with pytest.raises(QuoteVerificationError, match="report signature does not verify"):
        verify_snp(GOSEV_REPORT.read_bytes(), TRUSTEE_VCEK.read_bytes(), now=TRUSTEE_AT)


def test_flipped_vcek_signature_fails_the_chain() -> None:
    vcek = _flip(TRUSTEE_VCEK.read_bytes(), len(TRUSTEE_VCEK.read_bytes()) - 1)
    with pytest.raises(QuoteVerificationError, match="the VCEK is not signed by 'SEV-Milan'"):
        verify_snp(TRUSTEE_REPORT.read_bytes(), vcek, now=TRUSTEE_AT)


def test_garbage_vcek_is_a_parse_error() -> None:
    with pytest.raises(QuoteParseError, match=r"not an X\.509 certificate"):
        verify_snp(TRUSTEE_REPORT.read_bytes(), b"\x30\x03\x02\x01", now=TRUSTEE_AT)


@pytest.mark.parametrize(
    ("at", "reason"),
    [
        (dt.datetime(2022, 9, 1, tzinfo=dt.UTC), "certificate not yet valid: the VCEK"),
        (int(dt.datetime(2029, 9, 25, tzinfo=dt.UTC).timestamp()), "certificate expired: the VCEK"),
        (dt.datetime(2046, 1, 1, tzinfo=dt.UTC), "certificate expired: the ARK"),
    ],
)
def test_outside_the_validity_period(at: dt.datetime | int, reason: str) -> None:
    with pytest.raises(QuoteVerificationError, match=reason):
        verify_snp(
            GOSEV_REPORT.read_bytes(),
            GOSEV_VCEK.read_bytes(),
            chain=MILAN_CHAIN.read_bytes(),
            now=at,
        )


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_snp(GOSEV_REPORT.read_bytes(), GOSEV_VCEK.read_bytes(), now=dt.datetime(2022, 9, 25))


# --- chains -------------------------------------------------------------------------------

_NAME_TAIL = [
    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
    x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
    x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
]
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2045, 1, 1, tzinfo=dt.UTC)
FAKE_AT = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([*_NAME_TAIL, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ca(
    cn: str, key: rsa.RSAPrivateKey, issuer: str, issuer_key: rsa.RSAPrivateKey, serial: int
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA384(), rsa_padding=PSS)
    )


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def test_a_chain_whose_ark_is_not_pinned_is_refused() -> None:
    real_ask = x509.load_pem_x509_certificates(MILAN_CHAIN.read_bytes())[0]
    key = _rsa()
    fake_ark = _ca("ARK-Milan", key, "ARK-Milan", key, 65536)
    with pytest.raises(QuoteVerificationError, match="ARK is not a pinned AMD root"):
        verify_snp(
            TRUSTEE_REPORT.read_bytes(),
            TRUSTEE_VCEK.read_bytes(),
            chain=_pem(real_ask, fake_ark),
            now=TRUSTEE_AT,
        )


def test_a_chain_whose_ask_is_not_pinned_is_refused() -> None:
    real_ark = x509.load_pem_x509_certificates(MILAN_CHAIN.read_bytes())[1]
    ark_key, ask_key = _rsa(), _rsa()
    fake_ask = _ca("SEV-Milan", ask_key, "ARK-Milan", ark_key, 65537)
    with pytest.raises(QuoteVerificationError, match="ASK is not the pinned AMD signing key"):
        verify_snp(
            TRUSTEE_REPORT.read_bytes(),
            TRUSTEE_VCEK.read_bytes(),
            chain=_pem(fake_ask, real_ark),
            now=TRUSTEE_AT,
        )


def test_another_products_chain_is_refused() -> None:
    genoa = AMD_PRODUCTS["Genoa"]
    chain = _pem(
        x509.load_der_x509_certificate(genoa.ask_der), x509.load_der_x509_certificate(genoa.ark_der)
    )
    with pytest.raises(QuoteVerificationError, match="holds a Genoa certificate"):
        verify_snp(
            TRUSTEE_REPORT.read_bytes(), TRUSTEE_VCEK.read_bytes(), chain=chain, now=TRUSTEE_AT
        )


def test_a_chain_without_certificates_is_a_parse_error(pki: FakePki) -> None:
    with pytest.raises(QuoteParseError, match="no PEM certificate"):
        verify_snp(
            pki.report(), pki.chip_cert(), chain=b"junk", now=FAKE_AT, trusted_products=pki.trusted
        )


# --- pinned roots ---------------------------------------------------------------------------

PINNED_ARKS = {
    "Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}


@pytest.mark.parametrize("name", sorted(PINNED_ARKS))
def test_pinned_roots_are_amds_and_chain_to_the_ark(name: str) -> None:
    roots = AMD_PRODUCTS[name]
    assert roots.name == name
    assert roots.ark_sha256 == PINNED_ARKS[name]
    assert hashlib.sha256(roots.ark_der).hexdigest() == PINNED_ARKS[name]
    ark = x509.load_der_x509_certificate(roots.ark_der)
    assert ark.subject.rfc4514_string().startswith(f"CN=ARK-{name},")
    ark_key = ark.public_key()
    assert isinstance(ark_key, rsa.RSAPublicKey)
    assert roots.asvk_der is not None
    for der, cn in (
        (roots.ark_der, f"ARK-{name}"),
        (roots.ask_der, f"SEV-{name}"),
        (roots.asvk_der, f"SEV-VLEK-{name}"),
    ):
        cert = x509.load_der_x509_certificate(der)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
        ark_key.verify(cert.signature, cert.tbs_certificate_bytes, PSS, hashes.SHA384())


# --- the real VLEK report -------------------------------------------------------------------


def test_real_vlek_report_verifies() -> None:
    assert hashlib.sha256(VLEK_REPORT).hexdigest().startswith("decdab94")
    verified = verify_snp(VLEK_REPORT, VLEK_CERT, now=VLEK_AT)
    assert (verified.product, verified.key_kind) == ("Milan", "vlek")
    report = verified.report
    assert (report.version, report.signing_key, report.vmpl) == (3, 1, 1)
    assert report.cpuid_product == "Milan"
    assert report.chip_id == bytes(64)
    assert report.reported_tcb.raw == 0xD918000000000004
    assert SnpPolicy().validate(report) == [Mismatch("snp.vmpl", "0", "1")]


def test_vlek_report_claimed_as_vcek_is_refused() -> None:
    claimed_vcek = VLEK_REPORT[:0x48] + b"\x00" + VLEK_REPORT[0x49:]  # SIGNING_KEY := 0
    with pytest.raises(
        QuoteVerificationError,
        match=r"signing key mismatch: the report says it "
        r"is signed by the VCEK .* but the certificate is a VLEK",
    ):
        verify_snp(claimed_vcek, VLEK_CERT, now=VLEK_AT)


def test_vlek_outside_its_year_is_refused() -> None:
    with pytest.raises(QuoteVerificationError, match="certificate expired: the VLEK"):
        verify_snp(VLEK_REPORT, VLEK_CERT, now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))


# --- a fake AMD PKI: every later check with valid signatures --------------------------------

AMD = "1.3.6.1.4.1.3704.1"


@dataclasses.dataclass
class FakePki:
    """Own ARK/ASK/ASVK (RSA-PSS) and chip keys, pinned through `trusted_products`."""

    product: str
    ark_key: rsa.RSAPrivateKey
    ark: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    ask: x509.Certificate
    asvk_key: rsa.RSAPrivateKey
    asvk: x509.Certificate
    chip_key: ec.EllipticCurvePrivateKey

    @property
    def trusted(self) -> dict[str, AmdProductRoots]:
        return {
            self.product: AmdProductRoots(
                self.product, _der(self.ark), _der(self.ask), _der(self.asvk)
            )
        }

    def chip_cert(
        self,
        *,
        kind: str = "vcek",
        hwid: bytes | None = b"\x42" * 64,
        tcb: dict[str, int] | None = None,
        not_after: dt.datetime = NOT_AFTER,
        tcb_der: dict[str, bytes] | None = None,
    ) -> bytes:
        spl = {"1": 3, "2": 0, "3": 8, "8": 115} if tcb is None else tcb
        issuer, key = ("SEV-", self.ask_key) if kind == "vcek" else ("SEV-VLEK-", self.asvk_key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"SEV-{kind.upper()}"))
            .issuer_name(_name(issuer + self.product))
            .public_key(self.chip_key.public_key())
            .serial_number(1)  # AMD uses 0; the builder refuses it, the verifier ignores it
            .not_valid_before(NOT_BEFORE)
            .not_valid_after(not_after)
        )
        for suffix, value in spl.items():
            encoded = (tcb_der or {}).get(suffix, bytes([2, 1, value]))
            builder = builder.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{AMD}.3.{suffix}"), encoded),
                critical=False,
            )
        if hwid is not None:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{AMD}.4"), hwid),
                critical=False,
            )
        return _der(builder.sign(key, hashes.SHA384(), rsa_padding=PSS))

    def report(self, **changes: Any) -> bytes:
        """A version-2 report with `changes`, signed by the chip key."""
        base = SnpReport(
            version=2,
            guest_svn=1,
            policy=GuestPolicy(0x30000),
            family_id=bytes(16),
            image_id=bytes(16),
            vmpl=0,
            signature_algo=1,
            current_tcb=TcbVersion(0x7308000000000003),
            platform_info=1,
            signer_info=0,
            report_data=bytes(64),
            measurement=b"\x11" * 48,
            host_data=bytes(32),
            id_key_digest=bytes(48),
            author_key_digest=bytes(48),
            report_id=bytes(32),
            report_id_ma=b"\xff" * 32,
            reported_tcb=TcbVersion(0x7308000000000003),
            chip_id=b"\x42" * 64,
            committed_tcb=TcbVersion(0x7308000000000003),
            launch_tcb=TcbVersion(0x7308000000000003),
            signature_r=bytes(72),
            signature_s=bytes(72),
        )
        unsigned = dataclasses.replace(base, **changes)
        der = self.chip_key.sign(unsigned.signed_bytes, ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        signed = dataclasses.replace(
            unsigned, signature_r=r.to_bytes(72, "little"), signature_s=s.to_bytes(72, "little")
        )
        return signed.to_bytes()

    def crl(
        self,
        *,
        revoked: tuple[int, ...] = (),
        signer: str = "ark",
        next_update: dt.datetime = NOT_AFTER,
    ) -> bytes:
        issuer, key = {
            "ark": (self.ark, self.ark_key),
            "ask": (self.ask, self.ask_key),
            "stranger": (self.ark, _rsa()),
        }[signer]
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(NOT_BEFORE)
            .next_update(next_update)
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(NOT_BEFORE)
                .build()
            )
        return builder.sign(key, hashes.SHA384(), rsa_padding=PSS).public_bytes(Encoding.DER)


def _make_pki(product: str) -> FakePki:
    ark_key, ask_key, asvk_key = _rsa(), _rsa(), _rsa()
    ark = f"ARK-{product}"
    return FakePki(
        product=product,
        ark_key=ark_key,
        ark=_ca(ark, ark_key, ark, ark_key, 10),
        ask_key=ask_key,
        ask=_ca(f"SEV-{product}", ask_key, ark, ark_key, 11),
        asvk_key=asvk_key,
        asvk=_ca(f"SEV-VLEK-{product}", asvk_key, ark, ark_key, 12),
        chip_key=ec.generate_private_key(ec.SECP384R1()),
    )


@pytest.fixture(scope="module")
def pki() -> FakePki:
    return _make_pki("Milan")


@pytest.fixture(scope="module")
def turin_pki() -> FakePki:
    return _make_pki("Turin")


def test_fake_pki_report_verifies(pki: FakePki) -> None:
    verified = verify_snp(
        pki.report(),
        pki.chip_cert(),
        chain=_pem(pki.ask, pki.ark),
        now=FAKE_AT,
        trusted_products=pki.trusted,
    )
    assert (verified.product, verified.key_kind) == ("Milan", "vcek")


def test_fake_pki_is_not_trusted_by_default(pki: FakePki) -> None:
    with pytest.raises(QuoteVerificationError, match="ARK is not a pinned AMD root"):
        verify_snp(pki.report(), pki.chip_cert(), chain=_pem(pki.ask, pki.ark), now=FAKE_AT)
    with pytest.raises(QuoteVerificationError, match="the VCEK is not signed by 'SEV-Milan'"):
        verify_snp(pki.report(), pki.chip_cert(), now=FAKE_AT)


def test_chip_id_mismatch(pki: FakePki) -> None:
    with pytest.raises(QuoteVerificationError, match="chip ID does not match the VCEK's hwID"):
        verify_snp(
            pki.report(chip_id=b"\x43" * 64),
            pki.chip_cert(),
            now=FAKE_AT,
            trusted_products=pki.trusted,
        )


def test_masked_chip_id_skips_the_hwid_comparison(pki: FakePki) -> None:
    masked = pki.report(signer_info=0b10, chip_id=bytes(64))
    verified = verify_snp(masked, pki.chip_cert(), now=FAKE_AT, trusted_products=pki.trusted)
    assert verified.report.mask_chip_key


def test_missing_hwid_is_refused(pki: FakePki) -> None:
    with pytest.raises(QuoteVerificationError, match="no hwID extension"):
        verify_snp(
            pki.report(), pki.chip_cert(hwid=None), now=FAKE_AT, trusted_products=pki.trusted
        )


@pytest.mark.parametrize(
    ("tcb", "shown"),
    [
        ({"1": 2, "2": 0, "3": 8, "8": 115}, "certificate bootloader=2"),
        ({"1": 3, "2": 1, "3": 8, "8": 115}, "certificate bootloader=3 tee=1"),
        ({"1": 3, "2": 0, "3": 9, "8": 115}, "snp=9"),
        ({"1": 3, "2": 0, "3": 8, "8": 116}, "microcode=116"),
    ],
)
def test_reported_tcb_must_match_the_vcek(pki: FakePki, tcb: dict[str, int], shown: str) -> None:
    with pytest.raises(QuoteVerificationError, match="reported TCB does not match the VCEK") as e:
        verify_snp(pki.report(), pki.chip_cert(tcb=tcb), now=FAKE_AT, trusted_products=pki.trusted)
    assert shown in str(e.value)


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [
        (b"\x04\x01\x03", "blSPL extension is not a DER INTEGER"),
        (b"\x02\x02\x03", "blSPL extension is not a DER INTEGER"),
        (b"\x02\x01\x83", "blSPL extension is negative"),
        (b"\x02\x02\x00\x03", "blSPL extension is not minimally encoded"),
        (b"\x02\x02\x01\x03", "blSPL 259 does not fit a TCB byte"),
    ],
)
def test_malformed_tcb_extensions_are_refused(pki: FakePki, encoded: bytes, reason: str) -> None:
    cert = pki.chip_cert(tcb_der={"1": encoded})
    with pytest.raises(QuoteVerificationError, match=reason):
        verify_snp(pki.report(), cert, now=FAKE_AT, trusted_products=pki.trusted)


def test_two_byte_der_integer_is_read(pki: FakePki) -> None:
    # ucodeSPL 0xA9 needs a leading zero byte in DER (as in trustee's legacy VCEK).
    tcb = TcbVersion.from_parts(bootloader=3, tee=0, snp=8, microcode=0xA9)
    cert = pki.chip_cert(tcb_der={"8": b"\x02\x02\x00\xa9"})
    verified = verify_snp(
        pki.report(reported_tcb=tcb), cert, now=FAKE_AT, trusted_products=pki.trusted
    )
    assert verified.report.reported_tcb.microcode == 0xA9


def test_vlek_signed_report_claimed_as_vcek(pki: FakePki) -> None:
    # Validly signed by the VLEK key, but the report's SIGNING_KEY says VCEK.
    vlek = pki.chip_cert(kind="vlek", hwid=None)
    with pytest.raises(QuoteVerificationError, match="signing key mismatch"):
        verify_snp(pki.report(chip_id=bytes(64)), vlek, now=FAKE_AT, trusted_products=pki.trusted)
    verified = verify_snp(
        pki.report(signer_info=0b100, chip_id=bytes(64)),
        vlek,
        now=FAKE_AT,
        trusted_products=pki.trusted,
    )
    assert verified.key_kind == "vlek"


def test_vcek_certificate_with_a_vlek_report(pki: FakePki) -> None:
    with pytest.raises(QuoteVerificationError, match="says it is signed by the VLEK"):
        verify_snp(
            pki.report(signer_info=0b100),
            pki.chip_cert(),
            now=FAKE_AT,
            trusted_products=pki.trusted,
        )


def test_unsigned_report_is_refused(pki: FakePki) -> None:
    with pytest.raises(QuoteVerificationError, match=r"signed by the no key \(SIGNING_KEY=7\)"):
        verify_snp(
            pki.report(signer_info=0b11100),
            pki.chip_cert(),
            now=FAKE_AT,
            trusted_products=pki.trusted,
        )


def test_cpuid_must_name_the_certificates_product(pki: FakePki) -> None:
    genoa = pki.report(version=3, cpuid_fam_id=0x19, cpuid_mod_id=0x11, cpuid_step=1)
    with pytest.raises(QuoteVerificationError, match="CPUID names Genoa, the certificate Milan"):
        verify_snp(genoa, pki.chip_cert(), now=FAKE_AT, trusted_products=pki.trusted)


def test_expired_fake_vcek(pki: FakePki) -> None:
    cert = pki.chip_cert(not_after=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(QuoteVerificationError, match="certificate expired: the VCEK"):
        verify_snp(pki.report(), cert, now=FAKE_AT, trusted_products=pki.trusted)


def test_crls(pki: FakePki) -> None:
    report, cert, trusted = pki.report(), pki.chip_cert(), pki.trusted
    ok = verify_snp(
        report,
        cert,
        now=FAKE_AT,
        trusted_products=trusted,
        crls=[pki.crl(revoked=(99,)), pki.crl(signer="ask", revoked=(98,))],
    )
    assert ok.key_kind == "vcek"
    cases = [
        (pki.crl(revoked=(pki.ask.serial_number,)), "the ASK \\(serial 11\\) is revoked"),
        (pki.crl(signer="ask", revoked=(1,)), "the chip certificate \\(serial 1\\) is revoked"),
        (pki.crl(signer="stranger"), "CRL is not signed by the ARK"),
        (pki.crl(next_update=dt.datetime(2024, 1, 1, tzinfo=dt.UTC)), "CRL expired"),
        (b"not a crl", "CRL is malformed"),
    ]
    for crl, reason in cases:
        with pytest.raises(QuoteVerificationError, match=reason):
            verify_snp(report, cert, now=FAKE_AT, trusted_products=trusted, crls=[crl])


def test_a_foreign_crl_is_refused_for_amds_chain(pki: FakePki) -> None:
    # A CRL from the fake ARK (same issuer name, other key) does not speak for AMD's chain.
    crl = x509.load_der_x509_crl(pki.crl()).public_bytes(Encoding.PEM)
    with pytest.raises(QuoteVerificationError, match="CRL is not signed by the ARK"):
        verify_snp(
            TRUSTEE_REPORT.read_bytes(), TRUSTEE_VCEK.read_bytes(), now=TRUSTEE_AT, crls=[crl]
        )


def test_turin_uses_an_8_byte_hwid_and_the_fmc_tcb(turin_pki: FakePki) -> None:
    tcb = TcbVersion.from_parts(bootloader=1, tee=2, snp=3, microcode=4, fmc=5, layout="turin")
    cert = turin_pki.chip_cert(
        hwid=b"\x1e\x55\x0a\x8e\xe5\xcf\x9f\x4d", tcb={"9": 5, "1": 1, "2": 2, "3": 3, "8": 4}
    )
    chip_id = b"\x1e\x55\x0a\x8e\xe5\xcf\x9f\x4d" + bytes(56)
    report = turin_pki.report(reported_tcb=TcbVersion(tcb.raw), chip_id=chip_id)
    verified = verify_snp(report, cert, now=FAKE_AT, trusted_products=turin_pki.trusted)
    assert verified.product == "Turin"
    assert verified.report.reported_tcb.fmc == 5  # re-read in Turin's layout
    assert verified.report.reported_tcb.bootloader == 1
    bad = turin_pki.report(reported_tcb=TcbVersion(tcb.raw), chip_id=chip_id[:63] + b"\x01")
    with pytest.raises(QuoteVerificationError, match="chip ID does not match"):
        verify_snp(bad, cert, now=FAKE_AT, trusted_products=turin_pki.trusted)
    no_fmc = turin_pki.chip_cert(hwid=chip_id[:8], tcb={"1": 1, "2": 2, "3": 3, "8": 4})
    with pytest.raises(QuoteVerificationError, match="no fmcSPL extension"):
        verify_snp(report, no_fmc, now=FAKE_AT, trusted_products=turin_pki.trusted)


def test_unknown_issuer_is_refused(pki: FakePki) -> None:
    with pytest.raises(QuoteVerificationError, match="is not the ASK or ASVK of a known product"):
        verify_snp(
            pki.report(),
            pki.chip_cert(),
            now=FAKE_AT,
            trusted_products={"Genoa": dataclasses.replace(pki.trusted["Milan"], name="Genoa")},
        )


# --- revocation and the TCB floor on the client path (issue 21, item 14) -------------------


def test_revocation_checked_only_with_an_ark_crl(pki: FakePki) -> None:
    report, cert, trusted = pki.report(), pki.chip_cert(), pki.trusted
    assert not verify_snp(report, cert, now=FAKE_AT, trusted_products=trusted).revocation_checked
    by_ask = verify_snp(
        report, cert, now=FAKE_AT, trusted_products=trusted, crls=[pki.crl(signer="ask")]
    )
    assert not by_ask.revocation_checked  # the ASK cannot vouch for itself
    assert verify_snp(
        report, cert, now=FAKE_AT, trusted_products=trusted, crls=[pki.crl()]
    ).revocation_checked


def test_revoked_vlek_signer_is_refused(pki: FakePki) -> None:
    vlek = pki.chip_cert(kind="vlek", hwid=None)
    report = pki.report(signer_info=0b100, chip_id=bytes(64))
    crl = pki.crl(revoked=(pki.asvk.serial_number,))
    with pytest.raises(QuoteVerificationError, match=r"the ASVK \(serial 12\) is revoked"):
        verify_snp(report, vlek, now=FAKE_AT, trusted_products=pki.trusted, crls=[crl])


def test_a_crl_not_yet_valid_is_refused(pki: FakePki) -> None:
    crl = _crl_from(pki, last_update=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(QuoteVerificationError, match="CRL is not yet valid"):
        verify_snp(
            pki.report(), pki.chip_cert(), now=FAKE_AT, trusted_products=pki.trusted, crls=[crl]
        )


def _crl_from(pki: FakePki, *, last_update: dt.datetime) -> bytes:
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ark.subject)
        .last_update(last_update)
        .next_update(NOT_AFTER)
        .sign(pki.ark_key, hashes.SHA384(), rsa_padding=PSS)
        .public_bytes(Encoding.DER)
    )


def _trustee_document(crl: bytes = b"") -> Any:
    from blindinfer.protocol.evidence import EvidenceDocument

    return EvidenceDocument(
        kind="amd-snp",
        platform="snp",
        nonce=bytes(32),
        quote=TRUSTEE_REPORT.read_bytes(),
        collateral_json="",
        certificate_der=b"",
        chip_certificates=(("vcek", TRUSTEE_VCEK.read_bytes()),),
        crl=crl,
    )


OLD_MILAN = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}


def _evaluate(snp: dict[str, Any], crl: bytes = b"") -> list[Mismatch]:
    from blindinfer.attestation.policy import Policy
    from blindinfer.attestation.verifier import authenticate_document, evaluate_policy

    at = int(TRUSTEE_AT.timestamp())
    authentic = authenticate_document(_trustee_document(crl), allow_simulation=False, now=at)
    policy = Policy.from_dict({"snp": {"measurement": ["11" * 48], **snp}})
    return [
        m for m in evaluate_policy(authentic, (), policy, now=at) if m.field != "snp.measurement"
    ]


def test_real_evidence_without_a_crl_is_refused_by_the_policy() -> None:
    mismatches = _evaluate({"min_reported_tcb": OLD_MILAN})
    assert [m.field for m in mismatches] == ["snp.allow_missing_crl"]
    assert mismatches[0].got == "no CRL"


def test_a_missing_crl_is_accepted_only_when_the_policy_says_so() -> None:
    from blindinfer.attestation.verifier import RevocationNotCheckedWarning

    with pytest.warns(RevocationNotCheckedWarning, match="allow_missing_crl"):
        assert _evaluate({"min_reported_tcb": OLD_MILAN, "allow_missing_crl": True}) == []


def test_a_foreign_crl_in_real_evidence_is_not_authentic(pki: FakePki) -> None:
    from blindinfer.attestation.verifier import authenticate_document

    with pytest.raises(QuoteVerificationError, match="CRL is not signed by the ARK"):
        authenticate_document(
            _trustee_document(pki.crl()), allow_simulation=False, now=int(TRUSTEE_AT.timestamp())
        )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_default_tcb_floor_refuses_an_old_milan_tcb() -> None:
    mismatches = _evaluate({"allow_missing_crl": True})
    assert {m.field: (m.expected, m.got) for m in mismatches} == {
        "snp.min_reported_tcb.bootloader": (">= 4 (blindinfer's default floor for Milan)", "3"),
        "snp.min_reported_tcb.snp": (">= 22 (blindinfer's default floor for Milan)", "8"),
        "snp.min_reported_tcb.microcode": (">= 213 (blindinfer's default floor for Milan)", "115"),
    }


def test_the_policy_raises_and_lowers_the_floor_per_component() -> None:
    verified = verify_snp(VLEK_REPORT, VLEK_CERT, now=VLEK_AT)  # bl=4 tee=0 snp=24 ucode=217
    policy = SnpPolicy(vmpl=(1,))
    assert policy.validate(verified.report, product="Milan") == []
    raised = SnpPolicy(vmpl=(1,), min_reported_tcb=TcbMinimum(microcode=218))
    assert raised.validate(verified.report, product="Milan") == [
        Mismatch("snp.min_reported_tcb.microcode", ">= 218", "217")
    ]
    trustee = verify_snp(TRUSTEE_REPORT.read_bytes(), TRUSTEE_VCEK.read_bytes(), now=TRUSTEE_AT)
    lowered_one = SnpPolicy(min_reported_tcb=TcbMinimum(microcode=100))
    assert [m.field for m in lowered_one.validate(trustee.report, product="Milan")] == [
        "snp.min_reported_tcb.bootloader",
        "snp.min_reported_tcb.snp",
    ]


def test_the_default_floor_knows_each_product() -> None:
    from blindinfer.attestation.snp.policy import DEFAULT_MIN_TCB

    assert set(DEFAULT_MIN_TCB) == set(AMD_PRODUCTS)
    assert DEFAULT_MIN_TCB["Milan"].microcode == 0xD5  # AMD-SB-3019: 0x0A0011D5
    assert DEFAULT_MIN_TCB["Genoa"].microcode == 0x54  # AMD-SB-3019: 0x0A101154


def test_a_vcek_that_fails_to_parse_late_is_a_parse_error() -> None:
    """Byte 99 of this VCEK breaks a field that `cryptography` only parses when read: it
    used to escape as a bare ValueError (and out of connect())."""
    broken = TRUSTEE_VCEK.read_bytes()[:99] + b"\x00" + TRUSTEE_VCEK.read_bytes()[100:]
    with pytest.raises(QuoteParseError, match="malformed certificate or report"):
        verify_snp(TRUSTEE_REPORT.read_bytes(), broken, now=TRUSTEE_AT)
