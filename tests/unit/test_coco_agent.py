"""CocoAgentPlatform against a stand-in Attestation Agent on loopback serving REAL evidence:
a TDX quote from GCP and SEV-SNP reports (trustee's, go-sev-guest's) in the JSON the
attesters write (tests/support/stand_in_aa.py).

What a fixed asset can and cannot show: it covers its own report_data only, so the
accepted path asks for exactly that report_data and checks the evidence is the asset's
bytes (and still verifies); any other report_data must be refused. The SNP report arrives
parsed: its rebuild must give back AMD's signed bytes, byte for byte.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import struct
import urllib.parse
from pathlib import Path
from typing import Any

import dcap_qvl  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.attestation.intel.tdx_quote import parse_tdx_quote
from blindinfer.attestation.snp.verify import verify_snp
from blindinfer.errors import UsageError
from blindinfer.server.config import ServerConfig
from blindinfer.server.platforms import NoPlatformError, select_platform
from blindinfer.tee.coco_agent import (
    MAX_EVIDENCE_BYTES,
    AgentConfigError,
    CocoAgentError,
    CocoAgentPlatform,
    check_aa_url,
    encode_runtime_data,
    parse_snp_answer,
    parse_tdx_answer,
    snp_report_bytes,
)
from blindinfer.tee.configfs_tsm import SealingKeyUnavailableError, TsmError
from support import vectors
from support.fake_configfs import VectorCollateral, ask_ark
from support.stand_in_aa import StandInAa, sev_report_json, snp_answer, tdx_answer
from support.stand_in_cdh import Answer
from support.vectors import VECTORS

pytestmark = pytest.mark.filterwarnings(
    "ignore:Parsed a serial number:cryptography.utils.CryptographyDeprecationWarning"
)  # AMD chip certificates carry serial number 0 (see the vectors' README)

TRUSTEE_REPORT = (VECTORS / "files/trustee/test-report.bin").read_bytes()
TRUSTEE_VCEK = (VECTORS / "files/trustee/test-vcek.der").read_bytes()
GOSEV_REPORT = (VECTORS / "files/go-sev-guest/attestation.bin").read_bytes()
TDX_CASE = vectors.case("tdx_v4_gcp_cos113")
TDX_QUOTE = (VECTORS / str(TDX_CASE["evidence"])).read_bytes()
TDX_COLLATERAL = (VECTORS / str(TDX_CASE["collateral"])).read_text()


def snp_platform(url: str, **kwargs: Any) -> CocoAgentPlatform:
    return CocoAgentPlatform("snp", aa_url=url, **kwargs)


def tdx_platform(url: str, **kwargs: Any) -> CocoAgentPlatform:
    return CocoAgentPlatform(
        "tdx", aa_url=url, collateral=VectorCollateral(TDX_COLLATERAL), **kwargs
    )


def reason_of(platform: CocoAgentPlatform, report_data: bytes = bytes(64)) -> str:
    with pytest.raises(CocoAgentError) as info:
        platform.evidence(report_data)
    assert "\n" not in str(info.value)  # one line
    return info.value.reason


# -- the SNP report: sev's serde form back to the signed bytes ------------------------


@pytest.mark.parametrize("report", [TRUSTEE_REPORT, GOSEV_REPORT], ids=["trustee", "go-sev-guest"])
def test_rebuild_gives_back_the_real_report_byte_for_byte(report: bytes) -> None:
    assert snp_report_bytes(sev_report_json(report)) == report
    # and through JSON text, as the REST API carries it
    rebuilt, certs = parse_snp_answer(snp_answer(report))
    assert rebuilt == report and certs == {}


def test_rebuilt_trustee_report_verifies_with_the_snp_verifier() -> None:
    rebuilt, _ = parse_snp_answer(snp_answer(TRUSTEE_REPORT, [("VCEK", TRUSTEE_VCEK)]))
    chain = (VECTORS / "files/go-sev-guest/ask_ark_milan.pem").read_bytes()
    verified = verify_snp(
        rebuilt, TRUSTEE_VCEK, chain=chain, now=dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    )
    assert verified.product == "Milan" and verified.key_kind == "vcek"
    assert verified.report.to_bytes() == TRUSTEE_REPORT


def _normalised(data: bytes, version: int, family: int) -> bytes:
    """A report with the reserved bytes zero (what sev's serde form cannot carry)."""
    out = bytearray(data)
    struct.pack_into("<I", out, 0, version)
    out[0x4C:0x50] = bytes(4)
    turin = family == 0x1A if version >= 3 else out[0x1A8:0x1E0] == bytes(56)
    for off in (0x38, 0x180, 0x1E0, 0x1F0):
        if turin:
            out[off + 4 : off + 7] = bytes(3)
        else:
            out[off + 2 : off + 6] = bytes(4)
    if version >= 3:
        out[0x188] = family
        out[0x18B:0x1A0] = bytes(21)
    else:
        out[0x188:0x1A0] = bytes(24)
    out[0x1EB] = 0
    out[0x1EF] = 0
    out[0x1F8 if version < 5 else 0x208 : 0x2A0] = bytes(0x2A0 - (0x1F8 if version < 5 else 0x208))
    out[0x2A0 + 144 :] = bytes(368)
    return bytes(out)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(min_size=0x4A0, max_size=0x4A0),
    version=st.sampled_from([2, 3, 4, 5, 6]),
    family=st.sampled_from([0x19, 0x1A]),
)
def test_rebuild_is_the_inverse_of_sevs_reading(data: bytes, version: int, family: int) -> None:
    report = _normalised(data, version, family)
    if version == 2 and report[0x1A0:0x1E0] == bytes(64):
        return  # a masked chip ID: sev refuses a v2 report, so the AA never sends one
    assert snp_report_bytes(sev_report_json(report)) == report


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        (lambda r: r.update(version=1), "report version 1"),
        (lambda r: r.update(extra=1), "has fields ['extra']"),
        (lambda r: r.pop("signature"), "lacks ['signature']"),
        (lambda r: r.update(report_data=[0] * 63), "report_data is not an array of 64 bytes"),
        (lambda r: r.update(measurement=[256] + [0] * 47), "measurement is not an unsigned 8-bit"),
        (lambda r: r.update(policy=True), "policy is not an unsigned 64-bit"),
        (lambda r: r.update(policy=1 << 64), "policy is not an unsigned 64-bit"),
        (lambda r: r.update(chip_id=[0] * 64), "masked chip ID"),
        (lambda r: r.update(cpuid_fam_id=0x19), "cpuid_fam_id is set in a report version"),
        (lambda r: r.update(launch_mit_vector=0), "launch_mit_vector is set"),
        (lambda r: r["current_tcb"].update(fmc=1), "current_tcb.fmc is set in a Milan/Genoa"),
        (lambda r: r["current"].pop("build"), "current has fields"),
    ],
)
def test_malformed_reports_are_refused_with_what_is_wrong(change: Any, mentions: str) -> None:
    report = sev_report_json(TRUSTEE_REPORT)
    change(report)
    body = json.dumps({"attestation_report": report, "cert_chain": None}).encode()
    with pytest.raises(CocoAgentError, match="malformed") as info:
        parse_snp_answer(body)
    assert info.value.reason == "malformed_evidence"
    assert mentions in str(info.value)


def test_v3_report_needs_its_cpuid_fields_and_a_known_family() -> None:
    report = sev_report_json(_normalised(TRUSTEE_REPORT, 3, 0x19))
    assert snp_report_bytes(report)[0x188] == 0x19
    with pytest.raises(CocoAgentError, match="cpuid_mod_id is null"):
        snp_report_bytes({**report, "cpuid_mod_id": None})
    with pytest.raises(CocoAgentError, match="CPUID family 0x17 is not an SEV-SNP"):
        snp_report_bytes({**report, "cpuid_fam_id": 0x17})
    turin = sev_report_json(_normalised(TRUSTEE_REPORT, 5, 0x1A))
    with pytest.raises(CocoAgentError, match=r"launch_tcb\.fmc is null in a Turin report"):
        snp_report_bytes({**turin, "launch_tcb": {**turin["launch_tcb"], "fmc": None}})


def test_cert_chain_entries_by_role() -> None:
    ask, ark = ask_ark()
    body = snp_answer(
        TRUSTEE_REPORT,
        [
            ("VCEK", TRUSTEE_VCEK),
            ("ASK", ask),
            ("ARK", ark),
            ("CRL", b"\x01\x02"),
            ({"OTHER": "11111111-2222-3333-4444-555555555555"}, b"vendor"),
        ],
    )
    _, certs = parse_snp_answer(body)
    assert certs == {"vcek": TRUSTEE_VCEK, "ask": ask, "ark": ark}
    for chain, mentions in [
        ([("VCEK", b"a"), ("VCEK", b"b")], "lists the VCEK twice"),
        ([("PEK", b"a")], "unknown cert_type 'PEK'"),
        ([("VCEK", b"")], "the VCEK is not 1 to"),
    ]:
        with pytest.raises(CocoAgentError, match=mentions):
            parse_snp_answer(snp_answer(TRUSTEE_REPORT, chain))


# -- any bytes: a typed error or a result ---------------------------------------------


def _json_values() -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


@given(st.binary(max_size=2048))
def test_any_bytes_give_a_typed_error_or_a_result(body: bytes) -> None:
    for parse in (parse_tdx_answer, parse_snp_answer):
        reason = "ok"
        try:
            parse(body)
        except CocoAgentError as exc:
            reason = exc.reason
        assert reason in ("ok", "malformed_evidence", "wrong_tee")


@settings(max_examples=200)
@given(
    field=st.sampled_from(sorted(sev_report_json(TRUSTEE_REPORT))),
    value=_json_values(),
    chain=st.none() | _json_values(),
)
def test_any_field_value_gives_a_typed_error_or_a_report(
    field: str, value: Any, chain: Any
) -> None:
    report = {**sev_report_json(TRUSTEE_REPORT), field: value}
    body = json.dumps({"attestation_report": report, "cert_chain": chain})
    reason, rebuilt = "ok", bytes(0x4A0)
    try:
        rebuilt, _ = parse_snp_answer(body.encode())
    except CocoAgentError as exc:
        reason = exc.reason
    assert reason in ("ok", "malformed_evidence") and len(rebuilt) == 0x4A0


@given(quote=st.text(max_size=64), eventlog=_json_values())
def test_tdx_answer_shapes(quote: str, eventlog: Any) -> None:
    body = json.dumps({"quote": quote, "cc_eventlog": eventlog}).encode()
    try:
        expected: bytes | str = base64.b64decode(quote, validate=True) or "malformed_evidence"
    except ValueError:
        expected = "malformed_evidence"
    if eventlog is not None and not isinstance(eventlog, str):
        expected = "malformed_evidence"
    try:
        parsed: bytes | str = parse_tdx_answer(body)
    except CocoAgentError as exc:
        parsed = exc.reason
    assert parsed == expected


def test_tdx_answer_parsing_is_exact() -> None:
    assert parse_tdx_answer(tdx_answer(TDX_QUOTE, b"event log")) == TDX_QUOTE
    assert parse_tdx_answer(tdx_answer(TDX_QUOTE)) == TDX_QUOTE
    for body, mentions in [
        (b'{"quote": 1}', '"quote" is not a string'),
        (b'{"quote": "AAA*"}', '"quote" is not base64'),
        (b'{"quote": ""}', '"quote" is empty'),
        (b'{"quote": "AAAA", "cc_eventlog": 3}', '"cc_eventlog" is not a string'),
        (b'{"eventlog": "AAAA"}', 'no "quote"'),
        (b"[1]", "not a JSON object"),
        (b"\xff", "not JSON"),
    ]:
        with pytest.raises(CocoAgentError, match=mentions):
            parse_tdx_answer(body)


# -- the platform, over HTTP ----------------------------------------------------------


def test_snp_evidence_is_the_real_report_with_its_chain() -> None:
    asked = TRUSTEE_REPORT[0x50:0x90]
    ask, ark = ask_ark()
    answer = snp_answer(TRUSTEE_REPORT, [("ARK", ark), ("VCEK", TRUSTEE_VCEK), ("ASK", ask)])
    with StandInAa(answer) as aa:
        evidence = snp_platform(aa.url).evidence(asked)
    assert evidence.kind == "amd-snp"
    assert evidence.quote == TRUSTEE_REPORT
    assert evidence.collateral_json == ""
    assert evidence.certificates == (("vcek", TRUSTEE_VCEK), ("ask", ask), ("ark", ark))
    assert evidence.crl == b""
    (path,) = aa.requests
    url = urllib.parse.urlsplit(path)
    assert url.path == "/aa/evidence"
    query = dict(urllib.parse.parse_qsl(url.query))
    assert query == {"runtime_data": encode_runtime_data(asked), "encoding": "base64"}
    assert "=" not in query["runtime_data"] and len(query["runtime_data"]) == 86


def test_snp_without_a_vcek_takes_it_from_the_vcek_source() -> None:
    class Kds:
        def certificates_for(self, report: bytes) -> dict[str, bytes]:
            assert report == TRUSTEE_REPORT
            return {"vcek": TRUSTEE_VCEK}

        def crl_for(self, report: bytes) -> bytes:
            return b"crl"

    with StandInAa(snp_answer(TRUSTEE_REPORT)) as aa:
        evidence = snp_platform(aa.url, vcek_source=Kds(), crl_source=Kds()).evidence(
            TRUSTEE_REPORT[0x50:0x90]
        )
        assert evidence.certificates == (("vcek", TRUSTEE_VCEK),)
        assert evidence.crl == b"crl"
        with pytest.raises(TsmError) as info:
            snp_platform(aa.url).evidence(TRUSTEE_REPORT[0x50:0x90])
    assert str(info.value) == (
        "the report is signed with the VCEK but the host put no VCEK in the Attestation "
        "Agent's cert_chain; configure an AMD KDS URL (e.g. --kds-url https://kdsintf.amd.com)"
    )


def test_snp_evidence_over_other_report_data_is_refused() -> None:
    with StandInAa(snp_answer(TRUSTEE_REPORT, [("VCEK", TRUSTEE_VCEK)])) as aa:
        assert reason_of(snp_platform(aa.url), bytes(range(64))) == "report_data_mismatch"


def test_tdx_evidence_is_the_real_quote_with_collateral() -> None:
    asked = parse_tdx_quote(TDX_QUOTE).body.report_data
    with StandInAa(tdx_answer(TDX_QUOTE, b"ccel")) as aa:
        evidence = tdx_platform(aa.url).evidence(asked)
    assert evidence.kind == "intel-tdx"
    assert evidence.quote == TDX_QUOTE
    assert evidence.collateral_json == TDX_COLLATERAL
    collateral = dcap_qvl.QuoteCollateralV3.from_json(evidence.collateral_json)
    report = dcap_qvl.verify(evidence.quote, collateral, int(TDX_CASE["verify_at_unix"]))
    assert report.status == TDX_CASE["tcb_status"]


def test_tdx_evidence_over_other_report_data_is_refused() -> None:
    with StandInAa(tdx_answer(TDX_QUOTE)) as aa:
        assert reason_of(tdx_platform(aa.url), bytes(range(64))) == "report_data_mismatch"


def test_the_other_tees_evidence_is_refused_by_name() -> None:
    with StandInAa(snp_answer(TRUSTEE_REPORT)) as aa, pytest.raises(CocoAgentError) as info:
        tdx_platform(aa.url).evidence(bytes(64))
    assert info.value.reason == "wrong_tee"
    assert str(info.value).startswith(
        "--platform coco-tdx, but the Attestation Agent answered SEV-SNP evidence; use "
        "--platform coco-snp"
    )
    with StandInAa(tdx_answer(TDX_QUOTE)) as aa:
        assert reason_of(snp_platform(aa.url)) == "wrong_tee"


@pytest.mark.parametrize(
    ("answer", "reason", "mentions"),
    [
        (Answer(404, b"Attestation Feature Not Enabled"), "aa_not_enabled",
         "agent.guest_components_rest_api=all"),
        (Answer(500, b"AA-KBC get evidence failed"), "aa_failed", "HTTP 500: AA-KBC get"),
        (Answer(400, b"BAD REQUEST"), "aa_bad_request", "v0.21.0"),
        (Answer(403, b"Forbidden"), "aa_unexpected_status", "HTTP 403 (Forbidden)"),
        (Answer(200, b"{}", {"Content-Encoding": "gzip"}), "aa_unexpected_status",
         "content encoding 'gzip'"),
        (Answer(200, b"x" * (MAX_EVIDENCE_BYTES + 1), chunked=True), "evidence_too_large",
         f"more than {MAX_EVIDENCE_BYTES} bytes"),
        (Answer(200, b"not json"), "malformed_evidence", "not JSON"),
    ],
)  # fmt: skip
def test_http_failures_are_typed_one_line_errors(
    answer: Answer, reason: str, mentions: str
) -> None:
    with StandInAa(answer) as aa, pytest.raises(CocoAgentError) as info:
        snp_platform(aa.url).evidence(bytes(64))
    assert info.value.reason == reason
    assert mentions in str(info.value) and "\n" not in str(info.value)


def test_a_slow_agent_times_out() -> None:
    with StandInAa(Answer(200, b"{}", delay_s=2.0)) as aa:
        assert reason_of(snp_platform(aa.url, timeout_s=0.3)) == "aa_timeout"


def test_an_absent_agent_is_unreachable() -> None:
    with StandInAa(b"{}") as aa:
        url = aa.url
    assert reason_of(snp_platform(url)) == "aa_unreachable"


def test_report_data_must_be_64_bytes() -> None:
    with pytest.raises(ValueError, match="exactly 64 bytes"):
        snp_platform("http://127.0.0.1:8006").evidence(bytes(32))


# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("http://127.0.0.1:8006", "http://127.0.0.1:8006"),
        ("http://127.0.0.2:9/", "http://127.0.0.2:9"),
        ("http://[::1]:8006", "http://[::1]:8006"),
    ],
)
def test_loopback_aa_urls_are_accepted(text: str, normalised: str) -> None:
    assert check_aa_url(text) == normalised


def test_non_loopback_aa_urls_are_refused() -> None:
    hint = "give the Attestation Agent's REST API on this pod's loopback, e.g. --aa-url http://127.0.0.1:8006"
    with pytest.raises(AgentConfigError) as info:
        check_aa_url("http://10.0.0.1:8006")
    assert str(info.value) == (
        "Attestation Agent URL 'http://10.0.0.1:8006' is not a loopback address: evidence "
        "from outside the pod VM would not be this server's\n" + hint
    )
    for text in ("https://127.0.0.1:8006", "http://localhost:8006", "http://127.0.0.1:8006/aa"):
        with pytest.raises(AgentConfigError):
            CocoAgentPlatform("snp", aa_url=text)
    assert isinstance(info.value, UsageError)


def test_tdx_needs_collateral() -> None:
    with pytest.raises(AgentConfigError, match="configure a PCCS URL"):
        CocoAgentPlatform("tdx")


def test_no_sealing_key_and_the_refusal_names_the_key_broker() -> None:
    with pytest.raises(SealingKeyUnavailableError) as tdx:
        tdx_platform("http://127.0.0.1:8006").sealing_key()
    assert "TDX has no hardware sealing key" in str(tdx.value)
    with pytest.raises(SealingKeyUnavailableError) as snp:
        snp_platform("http://127.0.0.1:8006").sealing_key()
    for refusal in (str(tdx.value), str(snp.value)):
        assert refusal.endswith(
            "configure --store-key-resource kbs:///REPO/TYPE/TAG (Trustee's KBS through the "
            "Confidential Data Hub)"
        )


def test_select_platform_builds_the_agent_platform(tmp_path: Path) -> None:
    platform = select_platform(ServerConfig(platform="coco-snp", aa_url="http://127.0.0.1:9"))
    assert isinstance(platform, CocoAgentPlatform)
    assert platform.kind == "snp" and platform.aa_url == "http://127.0.0.1:9"
    with pytest.raises(NoPlatformError, match="PCCS"):
        select_platform(ServerConfig(platform="coco-tdx"))
    with pytest.raises(NoPlatformError, match="--snp-vmpl does not apply"):
        select_platform(ServerConfig(platform="coco-snp", snp_vmpl=2))
    with pytest.raises(AgentConfigError):
        ServerConfig(aa_url="http://10.1.1.1:8006")


def test_serve_parser_takes_the_new_options() -> None:
    from blindinfer.cli.main import build_parser

    args = build_parser().parse_args(
        [
            "serve",
            "--platform",
            "coco-tdx",
            "--aa-url",
            "http://[::1]:8006",
            "--pccs-url",
            "https://p",
        ]
    )
    assert args.platform == "coco-tdx" and args.aa_url == "http://[::1]:8006"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--aa-url", "http://example.com:8006"])
