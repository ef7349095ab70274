"""The policy as a whole: sections per evidence kind, GPU requirements, collateral age,
BlindAI manifests, and how authentic evidence of each kind meets them."""

from __future__ import annotations

from pathlib import Path

import pytest

from blindinfer.attestation.authenticate import authenticate
from blindinfer.attestation.policy import Policy, load_policy
from blindinfer.attestation.verifier import evaluate_policy
from blindinfer.errors import Mismatch, PolicyError
from support import vectors

MRE = "11" * 32


def test_at_least_one_cpu_section_is_required() -> None:
    with pytest.raises(PolicyError, match=r"at least one of the \[sgx\], \[tdx\], \[snp\]"):
        Policy.from_dict({"max_collateral_age_days": 3})


def test_snp_section_must_pin_the_guest() -> None:
    with pytest.raises(PolicyError, match=r"must pin snp\.measurement \(add measurement = "):
        Policy.from_dict({"snp": {"vmpl": [0]}})
    # A key digest is checked only in addition: the key's owner may sign any image.
    with pytest.raises(PolicyError, match=r"must pin snp\.measurement"):
        Policy.from_dict({"snp": {"id_key_digest": ["ab" * 48]}})
    pinned = {"measurement": ["cd" * 48], "id_key_digest": ["ab" * 48]}
    assert Policy.from_dict({"snp": pinned}).snp is not None


def test_collateral_age_must_be_positive() -> None:
    with pytest.raises(PolicyError, match="max_collateral_age_days must be a positive integer"):
        Policy.from_dict({"sgx": {"mrenclave": MRE}, "max_collateral_age_days": 0})


def _tdx_case() -> tuple[bytes, str, int]:
    case = next(c for c in vectors.cases("intel-dcap") if c["id"] == "tdx_v4_phala")
    return (
        vectors.path(case, "evidence").read_bytes(),
        vectors.path(case, "collateral").read_text(),
        case["verify_at_unix"],
    )


def test_evidence_of_a_kind_without_a_section_is_refused() -> None:
    quote, collateral, at = _tdx_case()
    authentic = authenticate("intel-tdx", quote, collateral_json=collateral, now=at)
    policy = Policy.from_dict({"sgx": {"mrenclave": MRE}})
    assert evaluate_policy(authentic, (), policy, now=at) == [
        Mismatch("kind", "evidence for [sgx]", "intel-tdx")
    ]


def test_tdx_section_applies_to_tdx_evidence() -> None:
    quote, collateral, at = _tdx_case()
    authentic = authenticate("intel-tdx", quote, collateral_json=collateral, now=at)
    mrtd = str(authentic.claims["mrtd"])
    assert evaluate_policy(authentic, (), Policy.from_dict({"tdx": {"mrtd": [mrtd]}}), now=at) == []
    wrong = evaluate_policy(authentic, (), Policy.from_dict({"tdx": {"mrtd": ["01" * 48]}}), now=at)
    assert [m.field for m in wrong] == ["tdx.mrtd"]


def test_collateral_older_than_allowed_is_a_mismatch() -> None:
    quote, collateral, at = _tdx_case()
    authentic = authenticate("intel-tdx", quote, collateral_json=collateral, now=at)
    mrtd = str(authentic.claims["mrtd"])
    fresh = Policy.from_dict({"tdx": {"mrtd": [mrtd]}, "max_collateral_age_days": 30})
    assert evaluate_policy(authentic, (), fresh, collateral_json=collateral, now=at) == []
    strict = Policy.from_dict({"tdx": {"mrtd": [mrtd]}, "max_collateral_age_days": 1})
    found = evaluate_policy(authentic, (), strict, collateral_json=collateral, now=at)
    assert [m.field for m in found] == [
        "collateral.tcb_info.issueDate",
        "collateral.qe_identity.issueDate",
    ]
    assert all(m.expected == "at most 1 days old" for m in found)


def test_gpu_requirement_without_gpu_evidence_is_a_mismatch(tmp_path: Path) -> None:
    quote, collateral, at = _tdx_case()
    authentic = authenticate("intel-tdx", quote, collateral_json=collateral, now=at)
    reference = tmp_path / "h100.json"
    reference.write_text('{"measurements": {"2": ["' + "ab" * 48 + '"]}}')
    policy_file = tmp_path / "policy.toml"
    mrtd = authentic.claims["mrtd"]
    policy_file.write_text(f'[tdx]\nmrtd = ["{mrtd}"]\n[gpu]\nreference_values = "h100.json"\n')
    policy = load_policy(policy_file)  # the reference file resolves next to the policy
    assert evaluate_policy(authentic, (), policy, now=at) == [
        Mismatch("gpu", "NVIDIA GPU evidence", "none")
    ]


def test_a_blindai_manifest_loads_as_an_sgx_policy(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(
        f'mr_enclave = "{MRE}"\n'
        "allow_debug = false\n"
        'attributes_flags_hex = "0x4"\n'
        'attributes_mask_flags_hex = "0xfffffffffffffffd"\n'
        'attributes_xfrm_hex = "0x3"\n'
        'attributes_mask_xfrm_hex = "0xffffffffffffff1b"\n'
        'misc_select_hex = "0x0"\n'
        'misc_mask_hex = "0xffffffff"\n'
    )
    policy = load_policy(manifest)  # detected as a BlindAI manifest: no [sgx] section
    assert policy.sgx is not None and policy.sgx.mrenclave == (bytes.fromhex(MRE),)
    assert policy.sgx.tcb_statuses == frozenset({"UpToDate"})
    assert policy.tdx is None and policy.snp is None
