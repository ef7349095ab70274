"""Policies must pin code (issue 21, items 13, 15, 16, 18), shown with the real evidence in
tests/assets/attestation-vectors.

The attacks: a [tdx] section pinning only host-chosen or usually-zero registers (mrconfigid,
one RTMR) accepted every real TD below; an [snp] section pinning only an all-zero ID/author
key digest accepted every guest launched without an ID block; `[snp] allow_debug = true`
was accepted; a TD launched without SEPT_VE_DISABLE, or MIGRATABLE, passed the default; and
`policy --from` copied an OutOfDate status and its advisories into the "suggested" policy.
Each is now refused when the policy is loaded (or by the default rule), and the checks run
on the parsed, authenticated reports as the verifier runs them."""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any

import pytest

from blindinfer.attestation.authenticate import Authentic, authenticate, authenticate_snp
from blindinfer.attestation.intel.tdx_policy import TdxPolicy
from blindinfer.attestation.intel.tdx_quote import TdReportBody, parse_tdx_quote
from blindinfer.attestation.offline import parse_time
from blindinfer.attestation.policy import Policy
from blindinfer.attestation.policy_toml import suggest
from blindinfer.attestation.verifier import evaluate_policy
from blindinfer.errors import Mismatch, PolicyError
from support import vectors

TDX_IDS = ["tdx_v4_phala", "tdx_v4_gcp_cos113", "tdx_v5_td15_gotdxguest", "tdx_v4_zkdcap_outofdate"]
SEPT_VE_DISABLE, MIGRATABLE, PKS, KL, PERFMON = 28, 29, 30, 31, 63


def _tdx(case_id: str) -> tuple[Authentic, int]:
    case = vectors.case(case_id)
    at = int(case["verify_at_unix"])
    authentic = authenticate(
        "intel-tdx",
        vectors.path(case, "evidence").read_bytes(),
        collateral_json=vectors.path(case, "collateral").read_text(),
        now=at,
    )
    return authentic, at


def _snp(case_id: str) -> Authentic:
    case = vectors.case(case_id)
    return authenticate_snp(
        vectors.path(case, "evidence").read_bytes()[int(case["evidence_offset"]) :],
        vectors.path(case, "chip_cert").read_bytes(),
        chain_pem=vectors.path(case, "ask_ark_chain").read_bytes(),
        now=parse_time(case["verify_at"]),
    )


def _with_attributes(authentic: Authentic, flip: int) -> Authentic:
    body = authentic.body
    assert isinstance(body, TdReportBody)
    value = int.from_bytes(body.td_attributes, "little") ^ (1 << flip)
    changed = dataclasses.replace(body, td_attributes=value.to_bytes(8, "little"))
    return dataclasses.replace(authentic, body=changed)


# -- item 13: [tdx] ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tds() -> dict[str, tuple[Authentic, int]]:
    return {case_id: _tdx(case_id) for case_id in TDX_IDS}


@pytest.mark.parametrize("field", ["mrconfigid", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrowner"])
def test_a_tdx_pin_that_identifies_no_code_is_refused_at_load(
    tds: dict[str, tuple[Authentic, int]], field: str
) -> None:
    """The values of a real TD (mrconfigid and rtmr3 are all zero in every one of them:
    the "pin" would have accepted all four unrelated TDs)."""
    authentic, _ = tds["tdx_v4_phala"]
    value = str(authentic.claims[field])
    with pytest.raises(PolicyError, match=r"must pin tdx\.mrtd \(add mrtd = "):
        Policy.from_dict({"tdx": {field: [value]}})
    with pytest.raises(PolicyError, match=r"must pin tdx\.mrtd"):
        Policy.from_toml(f'[tdx]\n{field} = ["{value}"]\nmrownerconfig = ["{"00" * 48}"]\n')


def test_the_unpinned_registers_really_are_shared_by_unrelated_tds(
    tds: dict[str, tuple[Authentic, int]],
) -> None:
    """Why the refusal matters: the four TDs share their mrconfigid and rtmr3 (all zero),
    while their MRTDs differ, so only an MRTD pin tells them apart."""
    bodies = [a.body for a, _ in tds.values()]
    assert all(isinstance(b, TdReportBody) for b in bodies)
    assert {b.mrconfigid for b in bodies} == {bytes(48)}  # type: ignore[union-attr]
    assert {b.rtmr3 for b in bodies} == {bytes(48)}  # type: ignore[union-attr]
    assert len({b.mrtd for b in bodies}) == len(bodies)  # type: ignore[union-attr]


def test_an_mrtd_pin_accepts_its_td_and_refuses_the_others(
    tds: dict[str, tuple[Authentic, int]],
) -> None:
    own, at = tds["tdx_v4_phala"]
    policy = Policy.from_dict({"tdx": {"mrtd": [str(own.claims["mrtd"])], "rtmr3": ["00" * 48]}})
    assert evaluate_policy(own, (), policy, now=at) == []
    for case_id in ("tdx_v4_gcp_cos113", "tdx_v5_td15_gotdxguest"):
        other, other_at = tds[case_id]
        fields = [m.field for m in evaluate_policy(other, (), policy, now=other_at)]
        assert fields == ["tdx.mrtd"]


def test_an_all_zero_mrtd_is_refused_at_load() -> None:
    with pytest.raises(PolicyError, match=r"tdx\.mrtd: an all-zero value identifies no code"):
        Policy.from_dict({"tdx": {"mrtd": ["00" * 48]}})


# -- item 13: [snp] and [sgx] --------------------------------------------------------------


@pytest.mark.parametrize("field", ["id_key_digest", "author_key_digest"])
def test_an_all_zero_key_digest_is_refused_at_load(field: str) -> None:
    """Real guests launched without an ID block (or without an author key) report all-zero
    digests, so such a "pin" accepted every one of them: the go-sev-guest one has both
    digests zero, the trustee one a zero author key digest."""
    guests = [_snp("snp_milan_trustee"), _snp("snp_milan_gosevguest_debug_guest")]
    zero = "00" * 48
    assert [g.claims["author_key_digest"] for g in guests] == [zero, zero]
    assert guests[1].claims["id_key_digest"] == zero
    with pytest.raises(PolicyError, match=rf"snp\.{field}: an all-zero value identifies no code"):
        Policy.from_dict({"snp": {field: [zero]}})
    with pytest.raises(PolicyError, match=rf"snp\.{field}: an all-zero value"):
        Policy.from_dict({"snp": {"measurement": [guests[0].claims["measurement"]], field: zero}})


def test_a_key_digest_alone_is_not_a_pin() -> None:
    with pytest.raises(PolicyError, match=r"must pin snp\.measurement \(add measurement = "):
        Policy.from_dict({"snp": {"id_key_digest": ["ab" * 48], "author_key_digest": ["cd" * 48]}})


def test_an_snp_measurement_pin_tells_the_real_guests_apart() -> None:
    trustee, debug = _snp("snp_milan_trustee"), _snp("snp_milan_gosevguest_debug_guest")
    policy = Policy.from_dict({"snp": {"measurement": [trustee.claims["measurement"]]}})
    assert policy.snp is not None
    own = [m.field for m in policy.snp.validate(trustee.body)]  # type: ignore[arg-type]
    other = [m.field for m in policy.snp.validate(debug.body)]  # type: ignore[arg-type]
    assert "snp.measurement" not in own and "snp.measurement" in other


def test_sgx_mrsigner_pins_code_only_with_isvprodid() -> None:
    signer = "ab" * 32
    with pytest.raises(PolicyError, match=r"must pin sgx\.isvprodid too"):
        Policy.from_dict({"sgx": {"mrsigner": [signer]}})
    assert Policy.from_dict({"sgx": {"mrsigner": [signer], "isvprodid": [1]}}).sgx is not None


# -- item 15: [snp] allow_debug ------------------------------------------------------------


def test_snp_allow_debug_true_is_refused_at_load_and_the_debug_guest_stays_refused() -> None:
    debug = _snp("snp_milan_gosevguest_debug_guest")
    pin: dict[str, Any] = {"measurement": [debug.claims["measurement"]]}
    with pytest.raises(PolicyError, match=r"snp\.allow_debug = true is not supported"):
        Policy.from_dict({"snp": {**pin, "allow_debug": True}})
    with pytest.raises(PolicyError, match=r"snp\.allow_debug = true is not supported"):
        Policy.from_toml(f'[snp]\nmeasurement = ["{pin["measurement"][0]}"]\nallow_debug = true\n')
    policy = Policy.from_dict({"snp": pin})
    assert policy.snp is not None
    found = policy.snp.validate(debug.body)  # type: ignore[arg-type]
    assert (
        Mismatch(
            "snp.allow_debug",
            "a guest policy without DEBUG (bit 19 clear)",
            "DEBUG allowed (policy 0xb0000)",
        )
        in found
    )


# -- item 16: TD_ATTRIBUTES ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flip", "shown"),
    [
        (SEPT_VE_DISABLE, "SEPT_VE_DISABLE clear"),
        (MIGRATABLE, "MIGRATABLE set"),
        (PKS, "PKS set"),
        (KL, "KL set"),
        (PERFMON, "PERFMON set"),
    ],
)
def test_a_td_launched_with_weakened_attributes_is_refused_by_default(
    tds: dict[str, tuple[Authentic, int]], flip: int, shown: str
) -> None:
    for case_id in ("tdx_v4_phala", "tdx_v4_gcp_cos113", "tdx_v5_td15_gotdxguest"):
        authentic, at = tds[case_id]
        policy = Policy.from_dict({"tdx": {"mrtd": [str(authentic.claims["mrtd"])]}})
        assert evaluate_policy(authentic, (), policy, now=at) == []  # as launched: accepted
        weakened = _with_attributes(authentic, flip)
        found = evaluate_policy(weakened, (), policy, now=at)
        assert [m.field for m in found] == ["tdx.td_attributes"]
        assert found[0].got.endswith(f"({shown})")
        assert found[0].expected.startswith("SEPT_VE_DISABLE (bit 28) set; MIGRATABLE (29)")


def test_a_real_td_without_sept_ve_disable_is_refused_unless_the_policy_states_it() -> None:
    """neg_tdx_spr_e4's TD has PKS set and SEPT_VE_DISABLE clear (0x40000000)."""
    case = vectors.case("neg_tdx_spr_e4_tcb_unrecognized")
    body = parse_tdx_quote(vectors.path(case, "evidence").read_bytes()).body
    assert body.td_attributes.hex() == "0000004000000000"
    default = TdxPolicy.from_dict({"mrtd": body.mrtd.hex()})
    assert default.validate(body, "UpToDate", ()) == [
        Mismatch(
            "tdx.td_attributes",
            "SEPT_VE_DISABLE (bit 28) set; MIGRATABLE (29), PKS (30), KL (31), PERFMON (63) clear",
            "0000004000000000 (SEPT_VE_DISABLE clear, PKS set)",
        )
    ]
    # Stating the attributes exactly is the explicit, reviewable way to accept such a TD.
    explicit = TdxPolicy.from_dict({"mrtd": body.mrtd.hex(), "td_attributes": "0000004000000000"})
    assert explicit.validate(body, "UpToDate", ()) == []
    # A mask states only its own bits: the others keep the default.
    only_pks = TdxPolicy.from_dict(
        {
            "mrtd": body.mrtd.hex(),
            "td_attributes": {"value": "0000004000000000", "mask": "0000004000000000"},
        }
    )
    assert [m.got for m in only_pks.validate(body, "UpToDate", ())] == [
        "0000004000000000 (SEPT_VE_DISABLE clear)"
    ]


def test_xfam_can_be_stated_exactly(tds: dict[str, tuple[Authentic, int]]) -> None:
    authentic, at = tds["tdx_v4_phala"]
    mrtd = str(authentic.claims["mrtd"])
    same = Policy.from_dict({"tdx": {"mrtd": [mrtd], "xfam": str(authentic.claims["xfam"])}})
    assert evaluate_policy(authentic, (), same, now=at) == []
    gcp_xfam = str(tds["tdx_v4_gcp_cos113"][0].claims["xfam"])
    other = Policy.from_dict({"tdx": {"mrtd": [mrtd], "xfam": gcp_xfam}})
    assert [m.field for m in evaluate_policy(authentic, (), other, now=at)] == ["tdx.xfam"]


# -- item 18: policy --from ----------------------------------------------------------------


def _active(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def test_suggested_policy_never_copies_out_of_date_status_or_advisories(
    tds: dict[str, tuple[Authentic, int]],
) -> None:
    authentic, at = tds["tdx_v4_zkdcap_outofdate"]
    assert authentic.tcb_status == "OutOfDate" and authentic.advisory_ids
    suggestion = suggest(authentic, "https://td.example:9924")
    text = suggestion.text
    active = _active(text)
    assert "OutOfDate" not in active
    assert not any(advisory in active for advisory in authentic.advisory_ids)
    assert "# WARNING: the server reports TCB status OutOfDate" in text
    assert '# tcb_statuses = ["UpToDate", "OutOfDate"]' in text  # there, for a human to decide
    assert len(suggestion.warnings) == 1 and "OutOfDate" in suggestion.warnings[0]
    # All-zero registers are never pins.
    assert "rtmr3 = " not in active and "mrconfigid = " not in active
    assert "# rtmr3 is all zero: not pinned" in text
    loaded = Policy.from_toml(text).tdx
    assert loaded is not None
    assert loaded.tcb_statuses == frozenset({"UpToDate"}) and not loaded.accepted_advisories
    assert loaded.rtmr3 == () and loaded.mrconfigid == ()
    # The suggested policy still refuses the server that it was suggested from.
    fields = [m.field for m in evaluate_policy(authentic, (), Policy.from_toml(text), now=at)]
    assert fields == ["tdx.tcb_status", "tdx.advisory_ids"]


@pytest.mark.parametrize("case_id", ["tdx_v4_phala", "tdx_v4_gcp_cos113", "tdx_v5_td15_gotdxguest"])
def test_suggested_tdx_policy_pins_mrtd_and_the_launch_attributes(
    tds: dict[str, tuple[Authentic, int]], case_id: str
) -> None:
    authentic, at = tds[case_id]
    suggestion = suggest(authentic, "https://td.example:9924")
    assert suggestion.warnings == []
    policy = Policy.from_toml(suggestion.text)
    assert policy.tdx is not None and policy.tdx.mrtd == (
        bytes.fromhex(str(authentic.claims["mrtd"])),
    )
    assert policy.tdx.td_attributes is not None and policy.tdx.xfam is not None
    assert evaluate_policy(authentic, (), policy, now=at) == []
    # ... and so it refuses the same TD launched migratable.
    found = evaluate_policy(_with_attributes(authentic, MIGRATABLE), (), policy, now=at)
    assert [m.field for m in found] == ["tdx.td_attributes"]


def test_suggested_policy_leaves_weakened_td_attributes_commented_out(
    tds: dict[str, tuple[Authentic, int]],
) -> None:
    authentic, at = tds["tdx_v4_phala"]
    weakened = _with_attributes(authentic, SEPT_VE_DISABLE)
    claims = dict(weakened.claims, td_attributes=weakened.body.td_attributes.hex())  # type: ignore[union-attr]
    weakened = dataclasses.replace(weakened, claims=claims)  # type: ignore[arg-type]
    suggestion = suggest(weakened, "https://td.example:9924")
    assert "td_attributes" not in _active(suggestion.text)
    assert '# td_attributes = "0000000000000000"' in suggestion.text
    assert suggestion.warnings and "SEPT_VE_DISABLE clear" in suggestion.warnings[0]
    found = evaluate_policy(weakened, (), Policy.from_toml(suggestion.text), now=at)
    assert [m.field for m in found] == ["tdx.td_attributes"]


def test_suggested_snp_policy_pins_the_measurement_and_warns_about_debug() -> None:
    debug = _snp("snp_milan_gosevguest_debug_guest")
    suggestion = suggest(debug, "https://cvm.example:9924")
    active = _active(suggestion.text)
    assert f'measurement = ["{debug.claims["measurement"]}"]' in active
    assert "id_key_digest" not in active and "author_key_digest" not in active  # all zero
    assert "allow_debug = true" not in suggestion.text
    assert any("allows debugging" in w for w in suggestion.warnings)
    loaded = tomllib.loads(suggestion.text)["snp"]
    assert loaded["allow_debug"] is False
    policy = Policy.from_toml(suggestion.text)
    assert policy.snp is not None
    fields = [m.field for m in policy.snp.validate(debug.body)]  # type: ignore[arg-type]
    assert "snp.allow_debug" in fields and "snp.measurement" not in fields
