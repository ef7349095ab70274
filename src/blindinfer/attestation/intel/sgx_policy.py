"""The [sgx] policy section: what a client requires of an SGX enclave (Gramine), as data.

Within the section an unset field is not checked and a list field accepts any of its values
(for rolling upgrades). Secure defaults: only the UpToDate TCB status, no advisories, never a
debug enclave. The section must pin the code identity (MRENCLAVE, or MRSIGNER with
ISVPRODID): without it, any enclave signed by anyone, or any product of the signer, would
pass. `sgx_validate` compares a quote with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blindinfer.attestation.policy_values import bool_value as _bool
from blindinfer.attestation.policy_values import hex_value as _hex
from blindinfer.attestation.policy_values import int_value as _int
from blindinfer.attestation.policy_values import list_value as _list
from blindinfer.attestation.policy_values import no_unknown as _no_unknown
from blindinfer.attestation.policy_values import str_value as _str
from blindinfer.attestation.policy_values import table_value as _table
from blindinfer.attestation.tcb import TCB_STATUSES as ALL_TCB_STATUSES
from blindinfer.errors import PolicyError

TCB_STATUSES = frozenset(ALL_TCB_STATUSES)


@dataclass(frozen=True, slots=True)
class MaskedValue:
    """`got` matches when (got & mask) == (value & mask), bytewise."""

    value: bytes
    mask: bytes

    def matches(self, got: bytes) -> bool:
        return len(got) == len(self.value) and all(
            (g & m) == (v & m) for g, v, m in zip(got, self.value, self.mask, strict=True)
        )

    def describe(self) -> str:
        return f"{self.value.hex()} under mask {self.mask.hex()}"


@dataclass(frozen=True, slots=True)
class SgxPolicy:
    mrenclave: tuple[bytes, ...] = ()
    mrsigner: tuple[bytes, ...] = ()
    isvprodid: tuple[int, ...] = ()
    min_isvsvn: int | None = None
    allow_debug: bool = False
    attributes: MaskedValue | None = None
    miscselect: MaskedValue | None = None
    tcb_statuses: frozenset[str] = field(default_factory=lambda: frozenset({"UpToDate"}))
    accepted_advisories: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.mrenclave and not self.mrsigner:
            raise PolicyError("an SGX policy must pin mrenclave or mrsigner (or both)")
        if not self.mrenclave and not self.isvprodid:
            raise PolicyError(
                "an SGX policy that pins sgx.mrsigner without sgx.mrenclave must pin "
                "sgx.isvprodid too (add isvprodid = [N]): otherwise every enclave product "
                "that signer ever signed would pass"
            )
        for name, values in (("mrenclave", self.mrenclave), ("mrsigner", self.mrsigner)):
            for value in values:
                if len(value) != 32:
                    raise PolicyError(f"sgx.{name} values are 32 bytes (64 hex digits)")
        for prodid in self.isvprodid:
            if not 0 <= prodid <= 0xFFFF:
                raise PolicyError("sgx.isvprodid values are 16-bit integers")
        if self.min_isvsvn is not None and not 0 <= self.min_isvsvn <= 0xFFFF:
            raise PolicyError("sgx.min_isvsvn is a 16-bit integer")
        if self.allow_debug:
            raise PolicyError(
                "sgx.allow_debug = true is not supported: a debug enclave's memory is open "
                "to the host, and dcap-qvl refuses debug quotes"
            )
        for name, masked, size in (
            ("attributes", self.attributes, 16),
            ("miscselect", self.miscselect, 4),
        ):
            if masked is not None and (len(masked.value) != size or len(masked.mask) != size):
                raise PolicyError(f"sgx.{name} value and mask are {size} bytes")
        unknown = self.tcb_statuses - TCB_STATUSES
        if unknown or not self.tcb_statuses:
            raise PolicyError(
                f"sgx.tcb_statuses must be a non-empty subset of {sorted(TCB_STATUSES)}"
            )


_SGX_FIELDS = {
    "mrenclave",
    "mrsigner",
    "isvprodid",
    "min_isvsvn",
    "allow_debug",
    "attributes",
    "miscselect",
    "tcb_statuses",
    "accepted_advisories",
}


def sgx_policy_from_dict(table: Mapping[str, Any]) -> SgxPolicy:
    _no_unknown(table, _SGX_FIELDS, "sgx")
    return SgxPolicy(
        mrenclave=tuple(_hex(v, "sgx.mrenclave") for v in _list(table.get("mrenclave"))),
        mrsigner=tuple(_hex(v, "sgx.mrsigner") for v in _list(table.get("mrsigner"))),
        isvprodid=tuple(_int(v, "sgx.isvprodid") for v in _list(table.get("isvprodid"))),
        min_isvsvn=None
        if "min_isvsvn" not in table
        else _int(table["min_isvsvn"], "sgx.min_isvsvn"),
        allow_debug=_bool(table.get("allow_debug", False), "sgx.allow_debug"),
        attributes=_masked(table.get("attributes"), "sgx.attributes", 16),
        miscselect=_masked(table.get("miscselect"), "sgx.miscselect", 4),
        tcb_statuses=frozenset(
            _str(v, "sgx.tcb_statuses") for v in _list(table.get("tcb_statuses", ["UpToDate"]))
        ),
        accepted_advisories=frozenset(
            _str(v, "sgx.accepted_advisories") for v in _list(table.get("accepted_advisories"))
        ),
    )


def _masked(value: object, where: str, size: int) -> MaskedValue | None:
    if value is None:
        return None
    table = _table(value, where)
    _no_unknown(table, {"value", "mask"}, where)
    if "value" not in table:
        raise PolicyError(f"{where} needs a value")
    raw_value = _hex(table["value"], f"{where}.value")
    raw_mask = _hex(table["mask"], f"{where}.mask") if "mask" in table else b"\xff" * size
    return MaskedValue(raw_value, raw_mask)
