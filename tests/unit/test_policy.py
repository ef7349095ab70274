"""Policy loading: every TOML field, every malformed case (PolicyError naming the field),
load_policy's three sources, and no exception other than PolicyError for any input."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.attestation.policy import (
    TCB_STATUSES,
    MaskedValue,
    Policy,
    SgxPolicy,
    load_policy,
)
from blindinfer.errors import PolicyError

MRE = bytes(range(32))
MRE_HEX = MRE.hex()
MRS = bytes(range(32, 64))
MRS_HEX = MRS.hex()


def test_minimal_policy_has_secure_defaults() -> None:
    policy = Policy.from_toml(f'[sgx]\nmrenclave = "{MRE_HEX}"\n')
    assert policy == Policy(sgx=SgxPolicy(mrenclave=(MRE,)))
    sgx = policy.sgx
    assert sgx.mrenclave == (MRE,)
    assert sgx.mrsigner == ()
    assert sgx.isvprodid == ()
    assert sgx.min_isvsvn is None
    assert sgx.allow_debug is False
    assert sgx.attributes is None
    assert sgx.miscselect is None
    assert sgx.tcb_statuses == frozenset({"UpToDate"})
    assert sgx.accepted_advisories == frozenset()


def test_every_field_as_lists() -> None:
    text = f"""
[sgx]
mrenclave = ["{MRE_HEX}", "{"ab" * 32}"]
mrsigner = ["{MRS_HEX}", "{"CD" * 32}"]
isvprodid = [1, 2, 65535]
min_isvsvn = 7
allow_debug = false
tcb_statuses = ["UpToDate", "SWHardeningNeeded"]
accepted_advisories = ["INTEL-SA-00334", "INTEL-SA-00615"]

[sgx.attributes]
value = "{"05" + "00" * 7 + "03" + "00" * 7}"
mask = "{"ff" * 8 + "00" * 8}"

[sgx.miscselect]
value = "00000000"
mask = "0f000000"
"""
    sgx = Policy.from_toml(text).sgx
    assert sgx.mrenclave == (MRE, b"\xab" * 32)
    assert sgx.mrsigner == (MRS, b"\xcd" * 32)
    assert sgx.isvprodid == (1, 2, 65535)
    assert sgx.min_isvsvn == 7
    assert sgx.allow_debug is False
    assert sgx.tcb_statuses == frozenset({"UpToDate", "SWHardeningNeeded"})
    assert sgx.accepted_advisories == frozenset({"INTEL-SA-00334", "INTEL-SA-00615"})
    assert sgx.attributes == MaskedValue(
        value=bytes([5]) + bytes(7) + bytes([3]) + bytes(7), mask=b"\xff" * 8 + bytes(8)
    )
    assert sgx.miscselect == MaskedValue(value=bytes(4), mask=bytes([0x0F, 0, 0, 0]))


def test_single_values_instead_of_lists() -> None:
    text = f"""
[sgx]
mrenclave = "{MRE_HEX}"
mrsigner = "{MRS_HEX}"
isvprodid = 9
tcb_statuses = "OutOfDate"
accepted_advisories = "INTEL-SA-00001"
"""
    sgx = Policy.from_toml(text).sgx
    assert sgx.mrenclave == (MRE,)
    assert sgx.mrsigner == (MRS,)
    assert sgx.isvprodid == (9,)
    assert sgx.tcb_statuses == frozenset({"OutOfDate"})
    assert sgx.accepted_advisories == frozenset({"INTEL-SA-00001"})


def test_mrsigner_with_isvprodid_is_enough() -> None:
    sgx = Policy.from_toml(f'[sgx]\nmrsigner = ["{MRS_HEX}"]\nisvprodid = [1]\n').sgx
    assert (sgx.mrenclave, sgx.mrsigner, sgx.isvprodid) == ((), (MRS,), (1,))


def test_mrsigner_alone_is_refused() -> None:
    """Every enclave product the signer ever signed would pass."""
    with pytest.raises(PolicyError, match=r"must pin sgx\.isvprodid too \(add isvprodid"):
        Policy.from_toml(f'[sgx]\nmrsigner = ["{MRS_HEX}"]\n')


def test_masked_value_default_mask_is_all_ones() -> None:
    text = f"""
[sgx]
mrenclave = "{MRE_HEX}"
attributes = {{ value = "{"11" * 16}" }}
miscselect = {{ value = "01020304" }}
"""
    sgx = Policy.from_toml(text).sgx
    assert sgx.attributes == MaskedValue(b"\x11" * 16, b"\xff" * 16)
    assert sgx.miscselect == MaskedValue(bytes([1, 2, 3, 4]), b"\xff" * 4)


def test_every_tcb_status_is_accepted() -> None:
    statuses = sorted(TCB_STATUSES)
    listed = ", ".join(f'"{s}"' for s in statuses)
    sgx = Policy.from_toml(f'[sgx]\nmrenclave = "{MRE_HEX}"\ntcb_statuses = [{listed}]\n').sgx
    assert sgx.tcb_statuses == frozenset(statuses)
    assert len(statuses) == 6


def test_masked_value_matching() -> None:
    masked = MaskedValue(value=bytes([0x05, 0xFF]), mask=bytes([0x07, 0x00]))
    assert masked.matches(bytes([0x05, 0x00]))
    assert masked.matches(bytes([0xFD, 0x12]))  # only the low 3 bits of byte 0 count
    assert not masked.matches(bytes([0x07, 0x00]))
    assert not masked.matches(bytes([0x05]))  # wrong length never matches
    assert masked.describe() == "05ff under mask 0700"


# ----------------------------------------------------------------------------- malformed

_OK = f'mrenclave = "{MRE_HEX}"\n'

MALFORMED: list[tuple[str, str, str]] = [
    # (id, toml text, regex the PolicyError message must match)
    ("missing-sgx", "", r"at least one of the \[sgx\], \[tdx\], \[snp\] sections"),
    (
        "unknown-top-level",
        f"[sgx]\n{_OK}[sev]\nx = 1\n",
        r"unknown field\(s\) in policy: \['sev'\]",
    ),
    (
        "unknown-sgx-field",
        f"[sgx]\n{_OK}mrenclav = 'x'\n",
        r"unknown field\(s\) in sgx: \['mrenclav'\]",
    ),
    ("sgx-not-a-table", "sgx = 1\n", r"^sgx must be a table"),
    ("no-pin", "[sgx]\nisvprodid = 1\n", r"must pin mrenclave or mrsigner"),
    (
        "empty-pin-lists",
        "[sgx]\nmrenclave = []\nmrsigner = []\n",
        r"must pin mrenclave or mrsigner",
    ),
    ("mrenclave-short", "[sgx]\nmrenclave = 'abcd'\n", r"sgx\.mrenclave values are 32 bytes"),
    (
        "mrenclave-long",
        f"[sgx]\nmrenclave = '{'00' * 33}'\n",
        r"sgx\.mrenclave values are 32 bytes",
    ),
    (
        "mrsigner-short",
        f"[sgx]\n{_OK}mrsigner = ['{'00' * 31}']\n",
        r"sgx\.mrsigner values are 32 bytes",
    ),
    (
        "mrenclave-non-hex",
        f"[sgx]\nmrenclave = '{'zz' * 32}'\n",
        r"sgx\.mrenclave: 'zz.*' is not hex",
    ),
    ("mrsigner-non-hex", f"[sgx]\n{_OK}mrsigner = '0'\n", r"sgx\.mrsigner: '0' is not hex"),
    ("mrenclave-int", "[sgx]\nmrenclave = 5\n", r"sgx\.mrenclave values are hex strings"),
    (
        "mrsigner-table",
        f"[sgx]\n{_OK}mrsigner = {{a = 1}}\n",
        r"sgx\.mrsigner values are hex strings",
    ),
    (
        "allow-debug-true",
        f"[sgx]\n{_OK}allow_debug = true\n",
        r"sgx\.allow_debug = true is not supported",
    ),
    (
        "allow-debug-string",
        f"[sgx]\n{_OK}allow_debug = 'no'\n",
        r"sgx\.allow_debug is true or false",
    ),
    ("isvprodid-string", f"[sgx]\n{_OK}isvprodid = '1'\n", r"sgx\.isvprodid values are integers"),
    ("isvprodid-bool", f"[sgx]\n{_OK}isvprodid = true\n", r"sgx\.isvprodid values are integers"),
    ("isvprodid-float", f"[sgx]\n{_OK}isvprodid = [1.0]\n", r"sgx\.isvprodid values are integers"),
    ("isvprodid-range", f"[sgx]\n{_OK}isvprodid = 65536\n", r"sgx\.isvprodid values are 16-bit"),
    ("isvprodid-negative", f"[sgx]\n{_OK}isvprodid = -1\n", r"sgx\.isvprodid values are 16-bit"),
    (
        "min-isvsvn-string",
        f"[sgx]\n{_OK}min_isvsvn = '3'\n",
        r"sgx\.min_isvsvn values are integers",
    ),
    ("min-isvsvn-range", f"[sgx]\n{_OK}min_isvsvn = 70000\n", r"sgx\.min_isvsvn is a 16-bit"),
    (
        "tcb-unknown",
        f"[sgx]\n{_OK}tcb_statuses = ['UpToDate', 'Revoked']\n",
        r"sgx\.tcb_statuses must be a non-empty subset",
    ),
    (
        "tcb-wrong-case",
        f"[sgx]\n{_OK}tcb_statuses = 'uptodate'\n",
        r"sgx\.tcb_statuses must be a non-empty subset",
    ),
    (
        "tcb-empty",
        f"[sgx]\n{_OK}tcb_statuses = []\n",
        r"sgx\.tcb_statuses must be a non-empty subset",
    ),
    ("tcb-int", f"[sgx]\n{_OK}tcb_statuses = [1]\n", r"sgx\.tcb_statuses values are strings"),
    (
        "advisory-int",
        f"[sgx]\n{_OK}accepted_advisories = [334]\n",
        r"sgx\.accepted_advisories values are strings",
    ),
    (
        "attributes-not-table",
        f"[sgx]\n{_OK}attributes = '{'00' * 16}'\n",
        r"sgx\.attributes must be a table",
    ),
    (
        "attributes-no-value",
        f"[sgx]\n{_OK}attributes = {{ mask = '{'00' * 16}' }}\n",
        r"sgx\.attributes needs a value",
    ),
    (
        "attributes-unknown-key",
        f"[sgx]\n{_OK}attributes = {{ value = '{'00' * 16}', bits = 1 }}\n",
        r"unknown field\(s\) in sgx\.attributes: \['bits'\]",
    ),
    (
        "attributes-short",
        f"[sgx]\n{_OK}attributes = {{ value = '00' }}\n",
        r"sgx\.attributes value and mask are 16 bytes",
    ),
    (
        "attributes-mask-short",
        f"[sgx]\n{_OK}attributes = {{ value = '{'00' * 16}', mask = 'ff' }}\n",
        r"sgx\.attributes value and mask are 16 bytes",
    ),
    (
        "attributes-non-hex",
        f"[sgx]\n{_OK}attributes = {{ value = '{'xy' * 16}' }}\n",
        r"sgx\.attributes\.value: .* is not hex",
    ),
    (
        "attributes-mask-int",
        f"[sgx]\n{_OK}attributes = {{ value = '{'00' * 16}', mask = 3 }}\n",
        r"sgx\.attributes\.mask values are hex strings",
    ),
    (
        "miscselect-long",
        f"[sgx]\n{_OK}miscselect = {{ value = '0000000000' }}\n",
        r"sgx\.miscselect value and mask are 4 bytes",
    ),
    ("miscselect-not-table", f"[sgx]\n{_OK}miscselect = 0\n", r"sgx\.miscselect must be a table"),
    ("not-toml", "[sgx\nmrenclave=", r"not valid TOML"),
    ("duplicate-key", f"[sgx]\n{_OK}{_OK}", r"not valid TOML"),
]


@pytest.mark.parametrize(
    ("text", "pattern"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_policy_raises_policy_error_naming_the_field(text: str, pattern: str) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_toml(text)
    assert type(info.value) is PolicyError
    assert re.search(pattern, str(info.value)), str(info.value)


def test_oversized_policy_text() -> None:
    with pytest.raises(PolicyError, match="too large"):
        Policy.from_toml("#" * (1 << 20) + "\n")


def test_sgx_policy_direct_construction_is_checked() -> None:
    with pytest.raises(PolicyError, match="mrenclave or mrsigner"):
        SgxPolicy()
    with pytest.raises(PolicyError, match=r"sgx\.mrenclave values are 32 bytes"):
        SgxPolicy(mrenclave=(b"\x00" * 31,))
    with pytest.raises(PolicyError, match=r"sgx\.allow_debug"):
        SgxPolicy(mrenclave=(MRE,), allow_debug=True)
    with pytest.raises(PolicyError, match=r"sgx\.miscselect value and mask are 4 bytes"):
        SgxPolicy(mrenclave=(MRE,), miscselect=MaskedValue(bytes(4), bytes(3)))
    with pytest.raises(PolicyError, match=r"sgx\.tcb_statuses"):
        SgxPolicy(mrenclave=(MRE,), tcb_statuses=frozenset())


@pytest.mark.parametrize("text", ["a = " + "[" * 5000, "a = " + "{b = " * 5000])
def test_deeply_nested_toml_raises_policy_error(text: str) -> None:
    with pytest.raises(PolicyError, match="not valid TOML"):
        Policy.from_toml(text)


# ----------------------------------------------------------------------------- sources


def _dict() -> dict[str, Any]:
    return {"sgx": {"mrenclave": [MRE_HEX], "isvprodid": 3, "min_isvsvn": 2}}


EXPECTED = Policy(sgx=SgxPolicy(mrenclave=(MRE,), isvprodid=(3,), min_isvsvn=2))


def test_load_policy_from_policy_returns_it() -> None:
    assert load_policy(EXPECTED) is EXPECTED


def test_load_policy_from_dict() -> None:
    assert load_policy(_dict()) == EXPECTED


def test_from_dict_accepts_raw_bytes_for_hex_fields() -> None:
    policy = Policy.from_dict({"sgx": {"mrenclave": MRE, "mrsigner": (MRS,)}})
    assert policy.sgx.mrenclave == (MRE,)
    assert policy.sgx.mrsigner == (MRS,)


def test_load_policy_from_path_and_str(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        f'[sgx]\nmrenclave = ["{MRE_HEX}"]\nisvprodid = [3]\nmin_isvsvn = 2\n', encoding="utf-8"
    )
    assert load_policy(path) == EXPECTED
    assert load_policy(str(path)) == EXPECTED
    assert Policy.from_file(path) == EXPECTED


def test_load_policy_from_missing_or_binary_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "absent.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(binary)


def test_load_policy_from_malformed_dict() -> None:
    with pytest.raises(PolicyError, match=r"unknown field\(s\) in sgx: \['mrenclve'\]"):
        load_policy({"sgx": {"mrenclve": MRE_HEX}})


# ----------------------------------------------------------------------------- fuzz

_FIELD_NAMES = st.sampled_from(
    [
        "sgx",
        "mrenclave",
        "mrsigner",
        "isvprodid",
        "min_isvsvn",
        "allow_debug",
        "attributes",
        "miscselect",
        "tcb_statuses",
        "accepted_advisories",
        "value",
        "mask",
    ]
)
_KEYS = st.one_of(_FIELD_NAMES, st.text(max_size=8))
_HEXISH = st.one_of(
    st.binary(max_size=40).map(bytes.hex),
    st.sampled_from([MRE_HEX, "00" * 16, "ff" * 4, "00000000", "UpToDate", "OutOfDate"]),
)
_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True),
    st.text(max_size=70),
    _HEXISH,
    st.binary(max_size=40),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=5)
    ),
    max_leaves=20,
)
_SGX_TABLES = st.dictionaries(_FIELD_NAMES, _VALUES, max_size=9)
_DOCUMENTS = st.one_of(
    st.dictionaries(_KEYS, _VALUES, max_size=3),
    st.builds(lambda t: {"sgx": t}, _SGX_TABLES),
    st.builds(lambda t: {"sgx": {"mrenclave": MRE_HEX, **t}}, _SGX_TABLES),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOCUMENTS)
def test_from_dict_raises_only_policy_error(document: dict[str, Any]) -> None:
    try:
        policy = Policy.from_dict(document)
    except PolicyError:
        return
    assert isinstance(policy.sgx, SgxPolicy)
    assert policy.sgx.mrenclave or policy.sgx.mrsigner
    assert not policy.sgx.allow_debug


_TOML_FRAGMENTS = st.sampled_from(
    [
        "[sgx]\n",
        f'mrenclave = "{MRE_HEX}"\n',
        f'mrsigner = ["{MRS_HEX}"]\n',
        "isvprodid = [1, 2]\n",
        "min_isvsvn = 3\n",
        "allow_debug = false\n",
        'tcb_statuses = ["UpToDate"]\n',
        "attributes = { value = '00' }\n",
        "[sgx.miscselect]\n",
        'value = "00000000"\n',
        "= ",
        "[",
        "]",
        '"',
        "\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(st.one_of(_TOML_FRAGMENTS, st.text(max_size=5)), max_size=12).map("".join),
    )
)
def test_from_toml_raises_only_policy_error(text: str) -> None:
    try:
        policy = Policy.from_toml(text)
    except PolicyError:
        return
    assert policy.sgx.mrenclave or policy.sgx.mrsigner
