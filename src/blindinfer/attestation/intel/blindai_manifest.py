"""Read BlindAI Core's enclave `manifest.toml` as a blindinfer `[sgx]` policy section.

Users migrating from BlindAI Core (0.6.x) already have a manifest that says which enclave
their client accepts. Its format (`manifest.prod.template.toml` and the client's
`_dcap_attestation.EnclaveManifest`) is eight top-level keys:

    mr_enclave                 64 hex digits (SHA-256 MRENCLAVE)
    allow_debug                bool
    attributes_flags_hex       "0x..." u64   ATTRIBUTES.FLAGS expected
    attributes_mask_flags_hex  "0x..." u64   which FLAGS bits are compared
    attributes_xfrm_hex        "0x..." u64   ATTRIBUTES.XFRM expected
    attributes_mask_xfrm_hex   "0x..." u64   which XFRM bits are compared
    misc_select_hex            "0x..." u32   MISCSELECT expected
    misc_mask_hex              "0x..." u32   which MISCSELECT bits are compared

BlindAI's `validate_attestation` accepts an enclave when `flags & mask_flags ==
flags_expected | INIT`, `xfrm & mask_xfrm == xfrm_expected`, `misc & misc_mask ==
misc_expected`, MRENCLAVE is equal, and DEBUG is clear unless `allow_debug`. These
translate exactly into `attributes`/`miscselect` `{value, mask}` pairs of our policy
(INIT is folded into the expected flags as BlindAI does), with one difference made
explicit: an expected bit outside its mask makes BlindAI's check unsatisfiable, so it is
refused here instead of producing a policy that can never match.

Deliberately stricter than BlindAI: `allow_debug = true` is refused (a debug enclave's
memory is open to the host), unknown keys are refused (a misspelt key would otherwise be
ignored silently), and the TCB statuses default to UpToDate only, where BlindAI also let
SW_HARDENING_NEEDED through; pass `tcb_statuses` to widen that on purpose.

This module does not import `attestation.policy` (which imports it); it returns plain
data in the shape of the TOML `[sgx]` table, so `Policy.from_dict({"sgx": ...})` does all
the size and type checking of the result once more.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from typing import Any, Final

from blindinfer.errors import PolicyError

__all__ = ["BLINDAI_MANIFEST_KEYS", "MAX_MANIFEST_BYTES", "load_blindai_manifest"]

MAX_MANIFEST_BYTES: Final = 64 * 1024
"""A BlindAI manifest is about 3 KiB, most of it comments."""

BLINDAI_MANIFEST_KEYS: Final = frozenset(
    {
        "mr_enclave",
        "allow_debug",
        "attributes_flags_hex",
        "attributes_mask_flags_hex",
        "attributes_xfrm_hex",
        "attributes_mask_xfrm_hex",
        "misc_select_hex",
        "misc_mask_hex",
    }
)
"""Every key of BlindAI 0.6.x's manifest; all are required, as BlindAI's loader requires."""

_SGX_FLAG_INIT: Final = 0x1
"""BlindAI ORs INIT into the expected flags: every report of a running enclave has it."""

_SGX_FLAG_DEBUG: Final = 0x2
_HEX_INT: Final = re.compile(r"(?:0[xX])?[0-9a-fA-F]{1,32}")


def _hex_int(document: dict[str, Any], key: str, bits: int) -> int:
    """An unsigned integer written in hex ("0x4" or "4"), as BlindAI's hex_to_u64/u32."""
    value = document[key]
    if not isinstance(value, str) or not _HEX_INT.fullmatch(value.strip()):
        raise PolicyError(f'BlindAI manifest: {key} must be a hex string such as "0x4"')
    number = int(value.strip(), 16)
    if number >= 1 << bits:
        raise PolicyError(f"BlindAI manifest: {key} is not an unsigned {bits}-bit integer")
    return number


def _masked(
    what: str, expected: int, mask: int, size: int, *, keys: tuple[str, str]
) -> dict[str, str]:
    """`{value, mask}` for our policy, refusing expectations that BlindAI could never meet."""
    outside = expected & ~mask
    if outside:
        raise PolicyError(
            f"BlindAI manifest: {keys[0]} sets bits {outside:#x} that {keys[1]} does not "
            f"compare; BlindAI would refuse every enclave's {what}, so this manifest is refused"
        )
    return {
        "value": expected.to_bytes(size, "little").hex(),
        "mask": mask.to_bytes(size, "little").hex(),
    }


def _strings(values: Iterable[str], where: str) -> list[str]:
    if isinstance(values, str):
        raise PolicyError(f"{where} must be a sequence of strings, not one string")
    out = list(values)
    if not all(isinstance(v, str) for v in out):
        raise PolicyError(f"{where} must be a sequence of strings")
    return out


def load_blindai_manifest(
    text: str,
    *,
    tcb_statuses: Iterable[str] = ("UpToDate",),
    accepted_advisories: Iterable[str] = (),
) -> dict[str, Any]:
    """The `[sgx]` policy table equivalent to a BlindAI Core `manifest.toml`.

    Raises PolicyError for anything BlindAI would not load, for unknown keys, for
    expectations that cannot match, and for `allow_debug = true`.
    """
    if not isinstance(text, str):
        raise PolicyError("a BlindAI manifest is TOML text")
    if len(text) > MAX_MANIFEST_BYTES:
        raise PolicyError(f"the BlindAI manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        document = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise PolicyError(f"the BlindAI manifest is not valid TOML: {exc}") from exc
    unknown = sorted(set(document) - BLINDAI_MANIFEST_KEYS)
    if unknown:
        raise PolicyError(
            f"unknown key(s) in the BlindAI manifest: {unknown}; "
            f"known: {sorted(BLINDAI_MANIFEST_KEYS)}"
        )
    missing = sorted(BLINDAI_MANIFEST_KEYS - set(document))
    if missing:
        raise PolicyError(f"the BlindAI manifest lacks {missing}")

    allow_debug = document["allow_debug"]
    if not isinstance(allow_debug, bool):
        raise PolicyError("BlindAI manifest: allow_debug must be true or false")
    if allow_debug:
        raise PolicyError(
            "BlindAI manifest: allow_debug = true is refused: a debug enclave's memory is "
            "readable by the host, so it protects nothing. Use a production manifest "
            "(allow_debug = false) with a production-signed enclave."
        )

    mr_enclave = document["mr_enclave"]
    if not isinstance(mr_enclave, str):
        raise PolicyError("BlindAI manifest: mr_enclave must be a hex string")
    try:
        mrenclave = bytes.fromhex(mr_enclave)
    except ValueError:
        raise PolicyError(f"BlindAI manifest: mr_enclave {mr_enclave[:80]!r} is not hex") from None
    if len(mrenclave) != 32:
        raise PolicyError("BlindAI manifest: mr_enclave must be 32 bytes (64 hex digits)")

    flags = _hex_int(document, "attributes_flags_hex", 64) | _SGX_FLAG_INIT
    mask_flags = _hex_int(document, "attributes_mask_flags_hex", 64)
    xfrm = _hex_int(document, "attributes_xfrm_hex", 64)
    mask_xfrm = _hex_int(document, "attributes_mask_xfrm_hex", 64)
    misc = _hex_int(document, "misc_select_hex", 32)
    misc_mask = _hex_int(document, "misc_mask_hex", 32)
    if flags & mask_flags & _SGX_FLAG_DEBUG:
        raise PolicyError(
            "BlindAI manifest: attributes_flags_hex requires the DEBUG flag; a debug "
            "enclave is never accepted"
        )
    flags_pair = _masked(
        "ATTRIBUTES.FLAGS (INIT is always expected)",
        flags,
        mask_flags,
        8,
        keys=("attributes_flags_hex", "attributes_mask_flags_hex"),
    )
    xfrm_pair = _masked(
        "ATTRIBUTES.XFRM",
        xfrm,
        mask_xfrm,
        8,
        keys=("attributes_xfrm_hex", "attributes_mask_xfrm_hex"),
    )
    misc_pair = _masked("MISCSELECT", misc, misc_mask, 4, keys=("misc_select_hex", "misc_mask_hex"))
    return {
        "mrenclave": [mrenclave.hex()],
        # ATTRIBUTES is FLAGS (u64) then XFRM (u64), both little-endian, as in the report.
        "attributes": {
            "value": flags_pair["value"] + xfrm_pair["value"],
            "mask": flags_pair["mask"] + xfrm_pair["mask"],
        },
        "miscselect": misc_pair,
        "tcb_statuses": _strings(tcb_statuses, "tcb_statuses"),
        "accepted_advisories": _strings(accepted_advisories, "accepted_advisories"),
    }
