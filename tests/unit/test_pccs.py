"""PccsCollateral against a fake PCCS that serves the pieces of REAL Intel collateral.

The vectors' collateral JSON is split into the HTTP responses a PCCS v4 would give (PCK
CRL + issuer chain header, TCB info and QE identity bodies + issuer chain headers, the
root CA CRL) and reassembled by the code under test, which must reproduce the vector
field by field and verify the vector's quote with dcap-qvl.
"""

from __future__ import annotations

import json
import urllib.parse
from datetime import datetime
from typing import Any

import dcap_qvl  # type: ignore[import-untyped]
import pytest
from cryptography import x509

from blindinfer.attestation.intel.pccs import (
    CollateralError,
    HttpResponse,
    PccsCollateral,
    quote_identity,
    raw_json_members,
)
from support import vectors
from support.vectors import VECTORS

DAY = 86400

# (manifest id, TEE path segment); one SGX (processor CA), one TDX (platform CA).
CASES = ["sgx_v3_phala_processor", "tdx_v4_gcp_cos113"]


def load_case(case_id: str) -> dict[str, Any]:
    return vectors.case(case_id)


def quote_of(case: dict[str, Any]) -> bytes:
    return (VECTORS / str(case["evidence"])).read_bytes()


def collateral_of(case: dict[str, Any]) -> dict[str, str]:
    doc: dict[str, str] = json.loads((VECTORS / case["collateral"]).read_text())
    return doc


def iso(value: str) -> int:
    return int(datetime.fromisoformat(value).timestamp())


def crl_times(hex_der: str) -> tuple[int, int]:
    crl = x509.load_der_x509_crl(bytes.fromhex(hex_der))
    assert crl.next_update_utc is not None
    return int(crl.last_update_utc.timestamp()), int(crl.next_update_utc.timestamp())


def window(col: dict[str, str]) -> tuple[int, int]:
    """(latest issue time, earliest nextUpdate) over the four signed pieces."""
    tcb, qe = json.loads(col["tcb_info"]), json.loads(col["qe_identity"])
    pck, root = crl_times(col["pck_crl"]), crl_times(col["root_ca_crl"])
    issued = max(iso(tcb["issueDate"]), iso(qe["issueDate"]), pck[0], root[0])
    expires = min(iso(tcb["nextUpdate"]), iso(qe["nextUpdate"]), pck[1], root[1])
    return issued, expires


def chain_header(pem: str) -> str:
    return urllib.parse.quote(pem, safe="")


class FakePccs:
    """Answers exactly the PCCS v4 URLs for one platform, from a vector's collateral."""

    def __init__(
        self,
        col: dict[str, str],
        *,
        tee: str,
        fmspc: str,
        ca: str,
        base: str = "https://pccs.test",
        with_rootcacrl: bool = True,
    ) -> None:
        self.col = col
        self.urls: list[str] = []
        self.fail = False
        v4 = f"{base}/{{}}/certification/v4"
        root_cert = x509.load_pem_x509_certificates(col["qe_identity_issuer_chain"].encode())[-1]
        dp = root_cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        self.root_crl_dp = next(iter(dp[0].full_name or ())).value
        self.routes: dict[str, HttpResponse] = {
            f"{v4.format('sgx')}/pckcrl?ca={ca}&encoding=der": HttpResponse(
                200,
                {"sgx-pck-crl-issuer-chain": chain_header(col["pck_crl_issuer_chain"])},
                bytes.fromhex(col["pck_crl"]),
            ),
            f"{v4.format(tee)}/tcb?fmspc={fmspc}": HttpResponse(
                200,
                {"tcb-info-issuer-chain": chain_header(col["tcb_info_issuer_chain"])},
                (
                    f'{{"tcbInfo":{col["tcb_info"]},"signature":"{col["tcb_info_signature"]}"}}'
                ).encode(),
            ),
            f"{v4.format(tee)}/qe/identity?update=standard": HttpResponse(
                200,
                {
                    "sgx-enclave-identity-issuer-chain": chain_header(
                        col["qe_identity_issuer_chain"]
                    )
                },
                (
                    f'{{"enclaveIdentity":{col["qe_identity"]},'
                    f'"signature":"{col["qe_identity_signature"]}"}}'
                ).encode(),
            ),
            # What Intel serves at the root certificate's CRL distribution point: DER.
            self.root_crl_dp: HttpResponse(200, {}, bytes.fromhex(col["root_ca_crl"])),
        }
        if with_rootcacrl:
            # PCCS serves the root CA CRL hex-encoded.
            self.routes[f"{v4.format('sgx')}/rootcacrl"] = HttpResponse(
                200, {}, col["root_ca_crl"].encode()
            )

    def __call__(self, url: str) -> HttpResponse:
        self.urls.append(url)
        if self.fail:
            raise OSError("connection refused")
        return self.routes.get(url, HttpResponse(404, {}, b"not found"))


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


def make(
    case_id: str, **kwargs: Any
) -> tuple[PccsCollateral, FakePccs, Clock, bytes, dict[str, Any]]:
    case = load_case(case_id)
    quote = quote_of(case)
    ident = quote_identity(quote)
    fake = FakePccs(collateral_of(case), tee=ident.tee, fmspc=ident.fmspc, ca=ident.ca, **kwargs)
    clock = Clock(int(case["verify_at_unix"]))
    return PccsCollateral("https://pccs.test/", fetch=fake, clock=clock), fake, clock, quote, case


@pytest.mark.parametrize("case_id", CASES)
def test_reassembles_the_vector_collateral_field_by_field(case_id: str) -> None:
    source, _, _, quote, case = make(case_id)
    built = json.loads(source.collateral_json(quote))
    expected = collateral_of(case)
    assert list(built) == list(expected)
    for field in expected:
        assert built[field] == expected[field], field


@pytest.mark.parametrize("case_id", CASES)
def test_dcap_qvl_verifies_the_vector_quote_with_the_built_collateral(case_id: str) -> None:
    source, _, _, quote, case = make(case_id)
    collateral = dcap_qvl.QuoteCollateralV3.from_json(source.collateral_json(quote))
    report = dcap_qvl.verify(quote, collateral, int(case["verify_at_unix"]))
    assert report.status == case["tcb_status"]
    assert sorted(report.advisory_ids) == sorted(case["advisory_ids"])


def test_quote_identity_reads_fmspc_ca_and_tee_from_the_pck_certificate() -> None:
    sgx = quote_identity(quote_of(load_case("sgx_v3_phala_processor")))
    tdx = quote_identity(quote_of(load_case("tdx_v4_gcp_cos113")))
    assert (sgx.tee, sgx.fmspc, sgx.ca) == ("sgx", "00A067110000", "processor")
    assert (tdx.tee, tdx.fmspc, tdx.ca) == ("tdx", "00806F050000", "platform")


def test_root_ca_crl_falls_back_to_the_distribution_point_without_pccs_rootcacrl() -> None:
    source, fake, _, quote, case = make("sgx_v3_phala_processor", with_rootcacrl=False)
    built = json.loads(source.collateral_json(quote))
    assert built["root_ca_crl"] == collateral_of(case)["root_ca_crl"]
    assert fake.urls[-1] == fake.root_crl_dp
    assert fake.root_crl_dp.startswith("https://certificates.trustedservices.intel.com/")


def test_second_call_is_served_from_the_cache() -> None:
    source, fake, clock, quote, case = make("sgx_v3_phala_processor")
    issued, _ = window(collateral_of(case))
    clock.now = issued + DAY
    first = source.collateral_json(quote)
    calls = len(fake.urls)
    assert calls == 4
    clock.now += 7 * DAY
    assert source.collateral_json(quote) == first
    assert len(fake.urls) == calls


def test_refreshes_when_less_than_ten_percent_of_the_window_is_left() -> None:
    source, fake, clock, quote, case = make("sgx_v3_phala_processor")
    issued, expires = window(collateral_of(case))
    margin = max(DAY, (expires - issued) // 10)
    assert margin > DAY  # a 30-day window: the 10 % rule is the one that applies here
    clock.now = issued + DAY
    source.collateral_json(quote)
    calls = len(fake.urls)
    clock.now = expires - margin - 60
    source.collateral_json(quote)
    assert len(fake.urls) == calls
    clock.now = expires - margin + 60
    source.collateral_json(quote)
    assert len(fake.urls) == 2 * calls


def test_failed_refresh_serves_still_valid_collateral_then_fails_once_expired() -> None:
    source, fake, clock, quote, case = make("sgx_v3_phala_processor")
    issued, expires = window(collateral_of(case))
    clock.now = issued + DAY
    good = source.collateral_json(quote)
    fake.fail = True
    clock.now = expires - 3600
    assert source.collateral_json(quote) == good
    clock.now = expires + 1
    with pytest.raises(CollateralError, match="connection refused"):
        source.collateral_json(quote)


def test_missing_issuer_chain_header_is_a_clear_error() -> None:
    source, fake, _, quote, _ = make("sgx_v3_phala_processor")
    url = next(u for u in fake.routes if "/tcb?" in u)
    fake.routes[url] = HttpResponse(200, {}, fake.routes[url].body)
    with pytest.raises(CollateralError, match="TCB-Info-Issuer-Chain"):
        source.collateral_json(quote)


def test_tcb_info_for_another_fmspc_is_refused() -> None:
    source, fake, _, quote, _ = make("sgx_v3_phala_processor")
    url = next(u for u in fake.routes if "/tcb?" in u)
    old = fake.routes[url]
    fake.routes[url] = HttpResponse(
        200, old.headers, old.body.replace(b"00A067110000", b"00906ED50000")
    )
    with pytest.raises(CollateralError, match="FMSPC"):
        source.collateral_json(quote)


def test_http_errors_name_the_url() -> None:
    source, fake, _, quote, _ = make("tdx_v4_gcp_cos113")
    fake.routes.clear()
    with pytest.raises(CollateralError, match=r"pckcrl\?ca=platform.*HTTP 404"):
        source.collateral_json(quote)


def test_raw_json_members_keep_the_exact_source_text() -> None:
    text = ' { "tcbInfo" : {"b":1, "a":"\\u00e9"} ,"signature":"00"}\n'
    members = raw_json_members(text)
    assert members == {"tcbInfo": '{"b":1, "a":"\\u00e9"}', "signature": '"00"'}


@pytest.mark.parametrize(
    "text", ["[]", '{"a":1', '{"a":1}x', '{"a":1,"a":2}', '{"a" 1}', "{" * 100000]
)
def test_raw_json_members_refuse_malformed_json(text: str) -> None:
    with pytest.raises(CollateralError):
        raw_json_members(text)


def test_quote_without_pck_chain_is_a_clear_error() -> None:
    with pytest.raises(CollateralError, match="PCK certificate"):
        quote_identity(b"\x03\x00" + bytes(100))


def test_base_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        PccsCollateral("file:///etc/passwd")
