"""What a client requires of an SEV-SNP guest, as data, and the comparison with a report.

Like the SGX section of `policy.py`: an unset field is not checked, a list field accepts
any of its values (for rolling upgrades), sizes and types are checked when the policy is
loaded, and `validate` reports every failing field at once. Secure defaults: a guest whose
policy lets the host debug it or attach a migration agent is refused, and only VMPL 0 (the
most privileged level, where a report can't come from a lesser, host-controlled
component) is accepted. A debug guest is ALWAYS refused: `allow_debug = true` is refused at
load, as in the [sgx] and [tdx] sections. An all-zero measurement or ID/author key digest
is refused at load (it pins no code); that the whole policy pins `measurement` is checked
where the sections are composed (`attestation.policy.Policy`). Call `validate` only on a
report that `verify_snp` accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Final

from blindinfer.attestation.policy_values import bool_value as _bool
from blindinfer.attestation.policy_values import int_value as _int
from blindinfer.attestation.snp.report import (
    MAX_REPORT_VERSION,
    MIN_REPORT_VERSION,
    SnpReport,
)
from blindinfer.errors import Mismatch, PolicyError

_BYTES_FIELDS: Final[Mapping[str, int]] = {
    "measurement": 48,
    "host_data": 32,
    "id_key_digest": 48,
    "author_key_digest": 48,
    "family_id": 16,
    "image_id": 16,
}
"""Byte-string fields and their sizes (AMD SEV-SNP ABI, ATTESTATION_REPORT)."""

_CODE_DIGESTS: Final = ("measurement", "id_key_digest", "author_key_digest")
"""Fields that may never be pinned to all zeros: a guest launched without an ID block
reports zero digests, so a zero "pin" accepts every such guest."""

_TCB_COMPONENTS: Final = ("bootloader", "tee", "snp", "microcode", "fmc")


@dataclass(frozen=True, slots=True)
class TcbMinimum:
    """Per-component minimum security versions; None means that component is not checked.

    `fmc` only exists on Turin: setting it refuses reports from Milan/Genoa.
    """

    bootloader: int | None = None
    tee: int | None = None
    snp: int | None = None
    microcode: int | None = None
    fmc: int | None = None

    def __post_init__(self) -> None:
        for name in _TCB_COMPONENTS:
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF
            ):
                raise PolicyError(f"snp.min_reported_tcb.{name} is an integer in 0..255")


DEFAULT_MIN_TCB: Final[Mapping[str, TcbMinimum]] = MappingProxyType(
    {
        # AMD-SB-3019 (CVE-2024-56161, Feb 2025): microcode 0x0A0011D5 (SPL 0xD5 = 213),
        # with the PSP bootloader/SNP firmware of the same fix (SPLs 4 and 22).
        "Milan": TcbMinimum(bootloader=4, tee=0, snp=22, microcode=213),
        # AMD-SB-3019: microcode 0x0A101154 (SPL 0x54 = 84); bootloader 10 and SNP 23 are
        # those of a patched Genoa VCEK issued 2025-01-24 (public, trustee test data).
        "Genoa": TcbMinimum(bootloader=10, tee=0, snp=23, microcode=84),
        # AMD-SB-7033 (2025): Turin's minimum microcode 0x0B002140 (SPL 0x40 = 64); no
        # public floor for Turin's PSP components is known: raise them in the policy.
        "Turin": TcbMinimum(microcode=64),
    }
)
"""The TCB a VCEK/VLEK must be certified for, per product, when the policy says nothing.

Why a default floor: a VCEK exists for every TCB a chip ever ran, so without one a host
can downgrade its firmware to a version with a known, published hole and still attest.
Sources and date in docs/policy.md ("SEV-SNP TCB floor"); `min_reported_tcb` raises (or,
deliberately, lowers) any component.
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpPolicy:
    """The [snp] section of a policy. `SnpPolicy()` only enforces the secure defaults."""

    measurement: tuple[bytes, ...] = ()
    host_data: tuple[bytes, ...] = ()
    id_key_digest: tuple[bytes, ...] = ()
    author_key_digest: tuple[bytes, ...] = ()
    family_id: tuple[bytes, ...] = ()
    image_id: tuple[bytes, ...] = ()
    allow_debug: bool = False
    allow_migration_agent: bool = False
    allow_smt: bool = True
    allow_missing_crl: bool = False
    min_reported_tcb: TcbMinimum | None = None
    vmpl: tuple[int, ...] = (0,)
    report_versions: tuple[int, ...] = ()
    guest_svn_min: int | None = None

    def __post_init__(self) -> None:
        for name, size in _BYTES_FIELDS.items():
            values = getattr(self, name)
            if not isinstance(values, tuple):
                raise PolicyError(f"snp.{name} is a tuple of byte strings")
            for value in values:
                if not isinstance(value, bytes) or len(value) != size:
                    raise PolicyError(f"snp.{name} values are {size} bytes ({2 * size} hex digits)")
        for name in ("allow_debug", "allow_migration_agent", "allow_smt"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"snp.{name} is true or false")
        if self.allow_debug:
            raise PolicyError(
                "snp.allow_debug = true is not supported: a guest whose policy allows "
                "debugging lets the host read and write its memory (as for sgx and tdx)"
            )
        for name in _CODE_DIGESTS:
            if any(value == bytes(len(value)) for value in getattr(self, name)):
                raise PolicyError(
                    f"snp.{name}: an all-zero value identifies no code (a guest launched "
                    "without an ID block reports zero key digests); pin the real value"
                )
        if not isinstance(self.allow_missing_crl, bool):
            raise PolicyError("snp.allow_missing_crl is true or false")
        if self.min_reported_tcb is not None and not isinstance(self.min_reported_tcb, TcbMinimum):
            raise PolicyError("snp.min_reported_tcb is a table of TCB components")
        if not self.vmpl or any(not _is_int(v) or not 0 <= v <= 3 for v in self.vmpl):
            raise PolicyError("snp.vmpl is a non-empty list of VMPLs (0..3)")
        if any(
            not _is_int(v) or not MIN_REPORT_VERSION <= v <= MAX_REPORT_VERSION
            for v in self.report_versions
        ):
            raise PolicyError(
                f"snp.report_versions values are report versions "
                f"({MIN_REPORT_VERSION}..{MAX_REPORT_VERSION})"
            )
        if self.guest_svn_min is not None and (
            not _is_int(self.guest_svn_min) or not 0 <= self.guest_svn_min < 1 << 32
        ):
            raise PolicyError("snp.guest_svn_min is a 32-bit unsigned integer")

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> SnpPolicy:
        """An SnpPolicy from the contents of an [snp] table (as TOML or JSON gives it).

        Raises `PolicyError` naming `snp.<field>` for unknown, ill-typed or wrongly sized
        fields, so a typo never silently disables a check.
        """
        if not isinstance(table, Mapping):
            raise PolicyError("snp must be a table")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(table) - known)
        if unknown:
            raise PolicyError(f"unknown field(s) in snp: {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, size in _BYTES_FIELDS.items():
            if name in table:
                values[name] = tuple(_hex(v, f"snp.{name}", size) for v in _list(table[name]))
        for name in ("allow_debug", "allow_migration_agent", "allow_smt"):
            if name in table:
                values[name] = _bool(table[name], f"snp.{name}")
        if "min_reported_tcb" in table:
            values["min_reported_tcb"] = _tcb_minimum(table["min_reported_tcb"])
        if "allow_missing_crl" in table:
            values["allow_missing_crl"] = _bool(table["allow_missing_crl"], "snp.allow_missing_crl")
        for name in ("vmpl", "report_versions"):
            if name in table:
                values[name] = tuple(_int(v, f"snp.{name}") for v in _list(table[name]))
        if "guest_svn_min" in table:
            values["guest_svn_min"] = _int(table["guest_svn_min"], "snp.guest_svn_min")
        return cls(**values)

    def validate(self, report: SnpReport, *, product: str | None = None) -> list[Mismatch]:
        """Every field of `report` that this policy refuses (empty: accepted)."""
        found: list[Mismatch] = []
        for name in _BYTES_FIELDS:
            allowed: tuple[bytes, ...] = getattr(self, name)
            got: bytes = getattr(report, name)
            if allowed and got not in allowed:
                found.append(Mismatch(f"snp.{name}", _any_of(allowed), got.hex()))
        policy = report.policy
        if policy.debug_allowed and not self.allow_debug:
            found.append(
                Mismatch(
                    "snp.allow_debug",
                    "a guest policy without DEBUG (bit 19 clear)",
                    f"DEBUG allowed (policy 0x{int(policy):x})",
                )
            )
        if policy.migrate_ma and not self.allow_migration_agent:
            found.append(
                Mismatch(
                    "snp.allow_migration_agent",
                    "a guest policy without MIGRATE_MA (bit 18 clear)",
                    f"MIGRATE_MA allowed (policy 0x{int(policy):x})",
                )
            )
        if policy.smt_allowed and not self.allow_smt:
            found.append(
                Mismatch(
                    "snp.allow_smt",
                    "a guest policy without SMT (bit 16 clear)",
                    f"SMT allowed (policy 0x{int(policy):x})",
                )
            )
        found.extend(_tcb_floor_mismatches(self.min_reported_tcb, report, product))
        if report.vmpl not in self.vmpl:
            found.append(Mismatch("snp.vmpl", _ints(self.vmpl), str(report.vmpl)))
        if self.report_versions and report.version not in self.report_versions:
            found.append(
                Mismatch("snp.report_versions", _ints(self.report_versions), str(report.version))
            )
        if self.guest_svn_min is not None and report.guest_svn < self.guest_svn_min:
            found.append(
                Mismatch("snp.guest_svn_min", f">= {self.guest_svn_min}", str(report.guest_svn))
            )
        return found


def _tcb_floor_mismatches(
    explicit: TcbMinimum | None, report: SnpReport, product: str | None
) -> list[Mismatch]:
    """The reported TCB (the one the VCEK/VLEK certifies) against the effective floor.

    The effective floor is `DEFAULT_MIN_TCB[product]`, each component replaced by the
    policy's `min_reported_tcb` value where it sets one (higher or, deliberately, lower).
    `product` is the one the chip certificate names (the verifier passes it); without it,
    the report's CPUID product is used, and a report of unknown product (version < 3) is
    held to the explicit minimum only.
    """
    name = product or report.cpuid_product
    default = DEFAULT_MIN_TCB.get(name) if name else None
    if default is None:
        return [] if explicit is None else _tcb_mismatches(explicit, report)
    parts = {
        component: (
            getattr(explicit, component)
            if explicit is not None and getattr(explicit, component) is not None
            else getattr(default, component)
        )
        for component in _TCB_COMPONENTS
    }
    found = _tcb_mismatches(TcbMinimum(**parts), report)
    return [
        m
        if explicit is not None and getattr(explicit, m.field.rsplit(".", 1)[1]) is not None
        else Mismatch(m.field, f"{m.expected} (blindinfer's default floor for {name})", m.got)
        for m in found
    ]


def _tcb_mismatches(minimum: TcbMinimum, report: SnpReport) -> list[Mismatch]:
    tcb = report.reported_tcb
    found: list[Mismatch] = []
    for name in _TCB_COMPONENTS:
        wanted: int | None = getattr(minimum, name)
        if wanted is None:
            continue
        got: int | None = getattr(tcb, name)
        if got is None or got < wanted:
            shown = "absent (not a Turin TCB)" if got is None else str(got)
            found.append(Mismatch(f"snp.min_reported_tcb.{name}", f">= {wanted}", shown))
    return found


def _any_of(values: tuple[bytes, ...]) -> str:
    return " or ".join(v.hex() for v in values)


def _ints(values: tuple[int, ...]) -> str:
    return " or ".join(str(v) for v in values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list(value: object) -> list[object]:
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _hex(value: object, where: str, size: int) -> bytes:
    if not isinstance(value, str):
        raise PolicyError(f"{where} values are hex strings")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise PolicyError(f"{where}: {value[:80]!r} is not hex") from None
    if len(raw) != size:
        raise PolicyError(f"{where} values are {size} bytes ({2 * size} hex digits)")
    return raw


def _tcb_minimum(value: object) -> TcbMinimum:
    if not isinstance(value, Mapping):
        raise PolicyError("snp.min_reported_tcb must be a table")
    unknown = sorted(str(k) for k in set(value) - set(_TCB_COMPONENTS))
    if unknown:
        raise PolicyError(
            f"unknown field(s) in snp.min_reported_tcb: {unknown}; known: {list(_TCB_COMPONENTS)}"
        )
    parts = {
        name: _int(value[name], f"snp.min_reported_tcb.{name}")
        for name in _TCB_COMPONENTS
        if name in value
    }
    return TcbMinimum(**parts)


__all__ = ["DEFAULT_MIN_TCB", "SnpPolicy", "TcbMinimum"]
