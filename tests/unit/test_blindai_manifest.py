"""load_blindai_manifest: BlindAI Core's manifest.toml becomes an equivalent [sgx] policy
table; debug, unknown keys and unsatisfiable masks are refused."""

from __future__ import annotations

import pytest

from blindinfer.attestation.intel.blindai_manifest import load_blindai_manifest
from blindinfer.attestation.intel.sgx_quote import parse_sgx_quote
from blindinfer.attestation.intel.sgx_validate import validate_sgx
from blindinfer.attestation.policy import MaskedValue, Policy
from blindinfer.errors import Mismatch, PolicyError
from support.vectors import VECTORS

REAL_SGX = VECTORS / "files" / "phala-dcap-qvl" / "sample_sgx_quote"

# MRENCLAVE of the real SGX vector quote (phala-dcap-qvl sample).
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"

# Written for these tests in the layout of BlindAI Core 0.6's production template.
SAMPLE = f"""\
# Which enclave this client accepts (BlindAI Core manifest layout).

# MRENCLAVE: the SHA-256 measurement of the enclave build we audited.
mr_enclave = "{MRENCLAVE}"

# Never true in production: a debug enclave can be read by the host.
allow_debug = false

# ATTRIBUTES.FLAGS: expect MODE64BIT; compare every bit except DEBUG, which is
# checked on its own through allow_debug.
attributes_flags_hex = "0x4"
attributes_mask_flags_hex = "0xfffffffffffffffd"

# ATTRIBUTES.XFRM: x87 and SSE must be enabled; AVX and AVX-512 state
# (bits 2, 5, 6 and 7) may vary with the host CPU.
attributes_xfrm_hex = "0x3"
attributes_mask_xfrm_hex = "0xffffffffffffff1b"

# MISCSELECT must be zero.
misc_select_hex = "0x0"
misc_mask_hex = "0xffffffff"
"""


def _with(key: str, value: str, text: str = SAMPLE) -> str:
    lines = [
        f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines()
    ]
    return "\n".join(lines) + "\n"


def _without(key: str) -> str:
    return "\n".join(line for line in SAMPLE.splitlines() if not line.startswith(f"{key} =")) + "\n"


def test_sample_manifest_translates_exactly() -> None:
    assert load_blindai_manifest(SAMPLE) == {
        "mrenclave": [MRENCLAVE],
        # FLAGS (INIT | MODE64BIT = 0x5) then XFRM (0x3), little-endian u64s.
        "attributes": {
            "value": "0500000000000000" + "0300000000000000",
            "mask": "fdffffffffffffff" + "1bffffffffffffff",
        },
        "miscselect": {"value": "00000000", "mask": "ffffffff"},
        "tcb_statuses": ["UpToDate"],
        "accepted_advisories": [],
    }


def test_result_loads_as_an_sgx_policy() -> None:
    sgx = Policy.from_dict({"sgx": load_blindai_manifest(SAMPLE)}).sgx
    assert sgx is not None
    assert sgx.mrenclave == (bytes.fromhex(MRENCLAVE),)
    assert sgx.attributes == MaskedValue(
        bytes.fromhex("0500000000000000" + "0300000000000000"),
        bytes.fromhex("fdffffffffffffff" + "1bffffffffffffff"),
    )
    assert sgx.miscselect == MaskedValue(bytes(4), b"\xff" * 4)
    assert not sgx.allow_debug
    assert sgx.tcb_statuses == frozenset({"UpToDate"})


def test_tcb_statuses_and_advisories_can_be_widened_on_purpose() -> None:
    table = load_blindai_manifest(
        SAMPLE,
        tcb_statuses=["UpToDate", "SWHardeningNeeded"],
        accepted_advisories=["INTEL-SA-00615"],
    )
    assert table["tcb_statuses"] == ["UpToDate", "SWHardeningNeeded"]
    assert table["accepted_advisories"] == ["INTEL-SA-00615"]
    with pytest.raises(PolicyError, match="tcb_statuses must be a sequence of strings"):
        load_blindai_manifest(SAMPLE, tcb_statuses="UpToDate")


def test_manifest_policy_against_the_real_sgx_quote() -> None:
    """The same decision BlindAI's validate_attestation makes on identity and attributes:
    the real quote (flags 0x5, xfrm 0xe7, miscselect 0) satisfies the sample manifest."""
    body = parse_sgx_quote(REAL_SGX.read_bytes()).body
    sgx = Policy.from_dict({"sgx": load_blindai_manifest(SAMPLE)}).sgx
    assert sgx is not None
    assert validate_sgx(body, "UpToDate", (), sgx) == []
    # XFRM bit 0 is compared: an expectation of 0x2 only fails as BlindAI would.
    strict = Policy.from_dict(
        {"sgx": load_blindai_manifest(_with("attributes_xfrm_hex", '"0x2"'))}
    ).sgx
    assert strict is not None
    assert validate_sgx(body, "UpToDate", (), strict) == [
        Mismatch(
            "attributes",
            "05000000000000000200000000000000 under mask fdffffffffffffff1bffffffffffffff",
            "0500000000000000e700000000000000",
        )
    ]
    other = Policy.from_dict(
        {"sgx": load_blindai_manifest(_with("mr_enclave", '"' + "ab" * 32 + '"'))}
    ).sgx
    assert other is not None
    assert [m.field for m in validate_sgx(body, "UpToDate", (), other)] == ["mrenclave"]


def test_allow_debug_true_is_refused_with_a_clear_message() -> None:
    with pytest.raises(PolicyError, match="allow_debug = true is refused: a debug enclave"):
        load_blindai_manifest(_with("allow_debug", "true"))


def test_debug_flag_required_by_the_flags_is_refused() -> None:
    with pytest.raises(PolicyError, match="requires the DEBUG flag"):
        load_blindai_manifest(
            _with(
                "attributes_mask_flags_hex",
                '"0xffffffffffffffff"',
                _with("attributes_flags_hex", '"0x6"'),
            )
        )


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("mr_enclave = ", "not valid TOML"),
        (
            SAMPLE + 'mr_signer = "00"\n',
            r"unknown key\(s\) in the BlindAI manifest: \['mr_signer'\]",
        ),
        (_without("misc_mask_hex"), r"lacks \['misc_mask_hex'\]"),
        (_with("allow_debug", '"false"'), "allow_debug must be true or false"),
        (_with("mr_enclave", '"abcd"'), "mr_enclave must be 32 bytes"),
        (_with("mr_enclave", '"xyz"'), "mr_enclave 'xyz' is not hex"),
        (_with("mr_enclave", "5"), "mr_enclave must be a hex string"),
        (_with("attributes_flags_hex", "4"), "attributes_flags_hex must be a hex string"),
        (_with("attributes_flags_hex", '"0xg"'), "attributes_flags_hex must be a hex string"),
        (_with("attributes_flags_hex", '"-0x4"'), "attributes_flags_hex must be a hex string"),
        (
            _with("attributes_xfrm_hex", '"0x10000000000000000"'),
            "attributes_xfrm_hex is not an unsigned 64-bit integer",
        ),
        (_with("misc_select_hex", '"0x100000000"'), "misc_select_hex is not an unsigned 32-bit"),
        # INIT is always expected by BlindAI: a mask that does not compare it never matches.
        (
            _with("attributes_mask_flags_hex", '"0xfffffffffffffffc"'),
            "sets bits 0x1 that attributes_mask_flags_hex does not compare",
        ),
        (
            _with("attributes_xfrm_hex", '"0x7"'),
            "sets bits 0x4 that attributes_mask_xfrm_hex does not compare",
        ),
        (
            _with("misc_mask_hex", '"0x0"', _with("misc_select_hex", '"0x1"')),
            "sets bits 0x1 that misc_mask_hex does not compare",
        ),
        ("x" * (64 * 1024 + 1), "larger than 65536 bytes"),
    ],
)
def test_malformed_manifests(text: str, phrase: str) -> None:
    with pytest.raises(PolicyError, match=phrase):
        load_blindai_manifest(text)


def test_hex_without_prefix_and_upper_case_are_accepted() -> None:
    table = load_blindai_manifest(
        _with("attributes_xfrm_hex", '"3"').replace(MRENCLAVE, MRENCLAVE.upper())
    )
    assert table["attributes"]["value"].endswith("0300000000000000")
    assert table["mrenclave"] == [MRENCLAVE]
