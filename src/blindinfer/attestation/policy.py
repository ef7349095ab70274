"""What a client requires of the server's TEE, as data.

A policy is loaded from TOML (or built in Python) into frozen objects whose sizes are
checked at load time. Within a section, an unset field is not checked, a list field
accepts any of its values (for rolling upgrades). Secure defaults: only the UpToDate TCB
status, no advisories, never a debug enclave. A policy must pin the code identity
(MRENCLAVE or MRSIGNER): without either, any enclave signed by anyone would pass.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blindinfer.attestation.intel.blindai_manifest import (
    BLINDAI_MANIFEST_KEYS,
    load_blindai_manifest,
)
from blindinfer.attestation.intel.tdx_policy import TdxPolicy
from blindinfer.attestation.nvidia.policy import NvidiaGpuPolicy
from blindinfer.attestation.policy_values import bool_value as _bool
from blindinfer.attestation.policy_values import int_value as _int
from blindinfer.attestation.policy_values import str_value as _str
from blindinfer.attestation.snp.policy import SnpPolicy
from blindinfer.attestation.tcb import TCB_STATUSES as ALL_TCB_STATUSES
from blindinfer.errors import PolicyError

TCB_STATUSES = frozenset(ALL_TCB_STATUSES)
MAX_POLICY_BYTES = 1 << 20


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


@dataclass(frozen=True, slots=True)
class Policy:
    """One section per evidence kind the client accepts; evidence of a kind without a
    section is refused. `gpu` adds requirements on NVIDIA GPU evidence (same nonce)."""

    sgx: SgxPolicy | None = None
    tdx: TdxPolicy | None = None
    snp: SnpPolicy | None = None
    gpu: NvidiaGpuPolicy | None = None
    max_collateral_age_days: int | None = None

    def __post_init__(self) -> None:
        if self.sgx is None and self.tdx is None and self.snp is None:
            raise PolicyError("a policy needs at least one of the [sgx], [tdx], [snp] sections")
        if self.snp is not None and not (
            self.snp.measurement or self.snp.id_key_digest or self.snp.author_key_digest
        ):
            raise PolicyError(
                "an [snp] section must pin measurement, id_key_digest or author_key_digest: "
                "without them any guest image would pass"
            )
        if self.max_collateral_age_days is not None and self.max_collateral_age_days <= 0:
            raise PolicyError("max_collateral_age_days must be a positive integer")

    @classmethod
    def from_toml(cls, text: str, *, base_dir: Path | None = None) -> Policy:
        if len(text) > MAX_POLICY_BYTES:
            raise PolicyError("the policy file is too large")
        try:
            document = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError) as exc:
            raise PolicyError(f"the policy is not valid TOML: {exc}") from exc
        if looks_like_blindai_manifest(document):
            return cls.from_dict({"sgx": load_blindai_manifest(text)})
        return cls.from_dict(document, base_dir=base_dir)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read the policy file {path}: {exc}") from exc
        return cls.from_toml(text, base_dir=Path(path).parent)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, base_dir: Path | None = None) -> Policy:
        """`base_dir` resolves relative file names (GPU reference values) in the policy."""
        _no_unknown(document, {"sgx", "tdx", "snp", "gpu", "max_collateral_age_days"}, "policy")
        age = document.get("max_collateral_age_days")
        return cls(
            sgx=_sgx(_table(document["sgx"], "sgx")) if "sgx" in document else None,
            tdx=TdxPolicy.from_dict(_table(document["tdx"], "tdx")) if "tdx" in document else None,
            snp=SnpPolicy.from_dict(_table(document["snp"], "snp")) if "snp" in document else None,
            gpu=NvidiaGpuPolicy.from_dict(_table(document["gpu"], "gpu"), base_dir=base_dir)
            if "gpu" in document
            else None,
            max_collateral_age_days=None if age is None else _int(age, "max_collateral_age_days"),
        )


def looks_like_blindai_manifest(document: Mapping[str, Any]) -> bool:
    """BlindAI Core's manifest.toml has top-level SGX keys and none of our sections."""
    return not ({"sgx", "tdx", "snp"} & document.keys()) and bool(
        BLINDAI_MANIFEST_KEYS & document.keys()
    )


def load_policy(source: Policy | str | Path | Mapping[str, Any]) -> Policy:
    """A Policy from a Policy, a TOML file path, or a dict shaped like the TOML."""
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return Policy.from_dict(source)
    return Policy.from_file(source)


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


def _sgx(table: Mapping[str, Any]) -> SgxPolicy:
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


def _no_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise PolicyError(f"unknown field(s) in {where}: {unknown}; known: {sorted(known)}")


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where} must be a table")
    return value


def _list(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _hex(value: object, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise PolicyError(f"{where} values are hex strings")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise PolicyError(f"{where}: {value[:80]!r} is not hex") from exc


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
