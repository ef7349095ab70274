"""What a client requires of an Intel TDX guest (the `[tdx]` policy section), as data.

Same rules as the SGX section in `attestation.policy`: sizes are checked at load time, an
unset field is not checked, a list accepts any of its values (for rolling upgrades), and
the defaults are the secure ones (only the UpToDate TCB status, no advisories). A debug
TD is ALWAYS refused: its memory is open to the host, so `allow_debug = true` is refused
at load and a td_attributes requirement that demands DEBUG is refused too.

A TDX policy must pin MRTD, the measurement of the TD's initial memory (its firmware): it
is the only register that identifies code on its own. RTMR0-2 are extended by that
firmware, so without MRTD a host could boot firmware of its choice that extends whatever it
likes; RTMR3 is usually all zero and MRCONFIGID is chosen by the host. They are checked
in addition to MRTD, never instead of it.

TD_ATTRIBUTES bits other than DEBUG are set by the host at launch too. By default a TD
must have SEPT_VE_DISABLE (bit 28: the host cannot inject #VE through EPT violations) and
none of MIGRATABLE (29), PKS (30), KL (31) or PERFMON (63); a policy that states
`td_attributes` decides the bits under its mask itself (bit numbers: Intel TDX module ABI,
TD_ATTRIBUTES, as the Linux kernel's asm/shared/tdx.h names them).

This module does not import `attestation.policy` (which imports it): the small helpers
it needs are kept local so the import graph has no cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from blindinfer.attestation.intel.tdx_quote import TD_ATTR_DEBUG, TdReportBody
from blindinfer.attestation.policy_values import bool_value as _bool
from blindinfer.attestation.policy_values import list_value as _list
from blindinfer.attestation.policy_values import str_value as _str
from blindinfer.attestation.tcb import TCB_STATUSES as ALL_TCB_STATUSES
from blindinfer.errors import Mismatch, PolicyError

__all__ = [
    "DEFAULT_TD_ATTRIBUTES",
    "MEASUREMENT_FIELDS",
    "PINNING_FIELDS",
    "MaskedBytes",
    "TdxPolicy",
    "default_td_attribute_violations",
]

TCB_STATUSES: Final = frozenset(ALL_TCB_STATUSES)

MEASUREMENT_FIELDS: Final = (
    "mrtd",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "mrconfigid",
    "mrowner",
    "mrownerconfig",
    "mrseam",
)
"""48-byte (SHA-384) registers that a policy may pin, each to a list of accepted values."""

PINNING_FIELDS: Final = ("mrtd",)
"""Must be pinned: the only register that identifies the TD's code on its own."""

DEFAULT_TD_ATTRIBUTES: Final = (
    ("SEPT_VE_DISABLE", 28, True),
    ("MIGRATABLE", 29, False),
    ("PKS", 30, False),
    ("KL", 31, False),
    ("PERFMON", 63, False),
)
"""(name, bit, required set) of the TD_ATTRIBUTES bits checked unless a policy's
`td_attributes` states them (bit 0, DEBUG, is always refused on top of these)."""

DEFAULT_TD_ATTRIBUTES_RULE: Final = (
    "SEPT_VE_DISABLE (bit 28) set; MIGRATABLE (29), PKS (30), KL (31), PERFMON (63) clear"
)

_MEASUREMENT_SIZE: Final = 48
_U64_SIZE: Final = 8
_TCB_SVN_SIZE: Final = 16

_FIELDS: Final = frozenset(
    {
        *MEASUREMENT_FIELDS,
        "td_attributes",
        "xfam",
        "min_tee_tcb_svn",
        "allow_debug",
        "tcb_statuses",
        "accepted_advisories",
    }
)


@dataclass(frozen=True, slots=True)
class MaskedBytes:
    """`got` matches when (got & mask) == (value & mask), bytewise.

    The same rule as `attestation.policy.MaskedValue`; a local twin, because importing
    that module from here would be an import cycle.
    """

    value: bytes
    mask: bytes

    def matches(self, got: bytes) -> bool:
        return len(got) == len(self.value) and all(
            (g & m) == (v & m) for g, v, m in zip(got, self.value, self.mask, strict=True)
        )

    def describe(self) -> str:
        return f"{self.value.hex()} under mask {self.mask.hex()}"


def _any_of(values: tuple[bytes, ...]) -> str:
    return " or ".join(v.hex() for v in values)


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxPolicy:
    """Requirements on an authentic TDX quote's TD report body and TCB verdict."""

    mrtd: tuple[bytes, ...] = ()
    rtmr0: tuple[bytes, ...] = ()
    rtmr1: tuple[bytes, ...] = ()
    rtmr2: tuple[bytes, ...] = ()
    rtmr3: tuple[bytes, ...] = ()
    mrconfigid: tuple[bytes, ...] = ()
    mrowner: tuple[bytes, ...] = ()
    mrownerconfig: tuple[bytes, ...] = ()
    mrseam: tuple[bytes, ...] = ()
    td_attributes: MaskedBytes | None = None
    xfam: MaskedBytes | None = None
    min_tee_tcb_svn: bytes | None = None
    allow_debug: bool = False
    tcb_statuses: frozenset[str] = field(default_factory=lambda: frozenset({"UpToDate"}))
    accepted_advisories: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in MEASUREMENT_FIELDS:
            for value in getattr(self, name):
                if not isinstance(value, bytes) or len(value) != _MEASUREMENT_SIZE:
                    raise PolicyError(f"tdx.{name} values are 48 bytes (96 hex digits)")
        if not self.mrtd:
            raise PolicyError(
                'a [tdx] policy must pin tdx.mrtd (add mrtd = ["<96 hex digits>"], as '
                "`blindinfer measure --image DIR --platform tdx` prints it): RTMRs and "
                "mrconfigid are only checked in addition, since without MRTD the host chooses "
                "the firmware that extends RTMR0-2, RTMR3 is usually all zero and mrconfigid "
                "is set by the host"
            )
        if any(value == bytes(_MEASUREMENT_SIZE) for value in self.mrtd):
            raise PolicyError("tdx.mrtd: an all-zero value identifies no code; pin the real MRTD")
        if self.allow_debug:
            raise PolicyError(
                "tdx.allow_debug = true is not supported: a debug TD's memory is open to "
                "the host, and dcap-qvl refuses debug quotes"
            )
        for name, masked in (("td_attributes", self.td_attributes), ("xfam", self.xfam)):
            if masked is not None and (
                len(masked.value) != _U64_SIZE or len(masked.mask) != _U64_SIZE
            ):
                raise PolicyError(f"tdx.{name} value and mask are 8 bytes (16 hex digits)")
        attrs = self.td_attributes
        if attrs is not None and attrs.value[0] & attrs.mask[0] & TD_ATTR_DEBUG:
            raise PolicyError(
                "tdx.td_attributes requires the DEBUG bit: a debug TD is never accepted"
            )
        if self.min_tee_tcb_svn is not None and len(self.min_tee_tcb_svn) != _TCB_SVN_SIZE:
            raise PolicyError("tdx.min_tee_tcb_svn is 16 bytes (32 hex digits)")
        if not self.tcb_statuses or not self.tcb_statuses <= TCB_STATUSES:
            raise PolicyError(
                f"tdx.tcb_statuses must be a non-empty subset of {sorted(TCB_STATUSES)}"
            )

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> TdxPolicy:
        """A policy from the `[tdx]` TOML table; PolicyError names the faulty `tdx.<field>`."""
        if not isinstance(table, Mapping):
            raise PolicyError("tdx must be a table")
        unknown = sorted(set(table) - _FIELDS)
        if unknown:
            raise PolicyError(f"unknown field(s) in tdx: {unknown}; known: {sorted(_FIELDS)}")
        measurements = {
            name: tuple(
                _hex(v, f"tdx.{name}", _MEASUREMENT_SIZE) for v in _nonempty_list(table, name)
            )
            for name in MEASUREMENT_FIELDS
            if name in table
        }
        min_svn = table.get("min_tee_tcb_svn")
        return cls(
            **measurements,
            td_attributes=_masked(table.get("td_attributes"), "tdx.td_attributes"),
            xfam=_masked(table.get("xfam"), "tdx.xfam"),
            min_tee_tcb_svn=None
            if min_svn is None
            else _hex(min_svn, "tdx.min_tee_tcb_svn", _TCB_SVN_SIZE),
            allow_debug=_bool(table.get("allow_debug", False), "tdx.allow_debug"),
            tcb_statuses=frozenset(
                _str(v, "tdx.tcb_statuses") for v in _list(table.get("tcb_statuses", ["UpToDate"]))
            ),
            accepted_advisories=frozenset(
                _str(v, "tdx.accepted_advisories") for v in _list(table.get("accepted_advisories"))
            ),
        )

    def validate(
        self, body: TdReportBody, tcb_status: str, advisory_ids: tuple[str, ...]
    ) -> list[Mismatch]:
        """Every field of `body` and the TCB verdict that this policy does not accept."""
        found: list[Mismatch] = []
        for name in MEASUREMENT_FIELDS:
            accepted: tuple[bytes, ...] = getattr(self, name)
            got: bytes = getattr(body, name)
            if accepted and got not in accepted:
                found.append(Mismatch(f"tdx.{name}", _any_of(accepted), got.hex()))
        if body.debug:
            found.append(
                Mismatch("tdx.debug", "a production TD (DEBUG attribute clear)", "DEBUG set")
            )
        for name, masked in (("td_attributes", self.td_attributes), ("xfam", self.xfam)):
            value: bytes = getattr(body, name)
            if masked is not None and not masked.matches(value):
                found.append(Mismatch(f"tdx.{name}", masked.describe(), value.hex()))
        found.extend(self._default_attribute_mismatches(body))
        minimum = self.min_tee_tcb_svn
        if minimum is not None and not all(
            g >= m for g, m in zip(body.tee_tcb_svn, minimum, strict=True)
        ):
            found.append(
                Mismatch(
                    "tdx.tee_tcb_svn",
                    f">= {minimum.hex()} (every byte)",
                    body.tee_tcb_svn.hex(),
                )
            )
        if tcb_status not in self.tcb_statuses:
            found.append(
                Mismatch("tdx.tcb_status", " or ".join(sorted(self.tcb_statuses)), tcb_status)
            )
        unaccepted = [a for a in advisory_ids if a not in self.accepted_advisories]
        if unaccepted:
            accepted_ids = ", ".join(sorted(self.accepted_advisories)) or "none"
            found.append(
                Mismatch(
                    "tdx.advisory_ids",
                    f"only accepted ones ({accepted_ids})",
                    ", ".join(unaccepted),
                )
            )
        return found

    def _default_attribute_mismatches(self, body: TdReportBody) -> list[Mismatch]:
        """The default TD_ATTRIBUTES rule, for every bit the policy's mask leaves open."""
        mask = self.td_attributes.mask if self.td_attributes is not None else bytes(_U64_SIZE)
        wrong = default_td_attribute_violations(body.td_attributes, stated_mask=mask)
        if not wrong:
            return []
        return [
            Mismatch(
                "tdx.td_attributes",
                DEFAULT_TD_ATTRIBUTES_RULE,
                f"{body.td_attributes.hex()} ({', '.join(wrong)})",
            )
        ]


def default_td_attribute_violations(
    td_attributes: bytes, *, stated_mask: bytes = bytes(_U64_SIZE)
) -> list[str]:
    """What in `td_attributes` (8 bytes, as in the quote) breaks the default rule, e.g.
    ["SEPT_VE_DISABLE clear", "PKS set"], skipping the bits a policy's mask states."""
    got = int.from_bytes(td_attributes, "little")
    stated = int.from_bytes(stated_mask, "little")
    return [
        f"{name} {'clear' if required else 'set'}"
        for name, bit, required in DEFAULT_TD_ATTRIBUTES
        if not stated >> bit & 1 and bool(got >> bit & 1) != required
    ]


def _nonempty_list(table: Mapping[str, Any], name: str) -> list[object]:
    """An explicit empty list would silently check nothing: refuse it, omit the field."""
    values = _list(table[name])
    if not values:
        raise PolicyError(f"tdx.{name} is an empty list; give at least one value or omit the field")
    return values


def _hex(value: object, where: str, size: int) -> bytes:
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise PolicyError(f"{where}: {value[:100]!r} is not hex") from None
    else:
        raise PolicyError(f"{where} values are hex strings")
    if len(raw) != size:
        raise PolicyError(
            f"{where} values are {size} bytes ({2 * size} hex digits), not {len(raw)}"
        )
    return raw


def _masked(value: object, where: str) -> MaskedBytes | None:
    """A hex string is an exact value (every bit stated); a {value, mask} table states
    only the bits under its mask."""
    if value is None:
        return None
    if isinstance(value, str):
        return MaskedBytes(_hex(value, where, _U64_SIZE), b"\xff" * _U64_SIZE)
    if not isinstance(value, Mapping):
        raise PolicyError(
            f"{where} must be a hex string (exact value) or a table with value (and "
            "optionally mask)"
        )
    unknown = sorted(set(value) - {"value", "mask"})
    if unknown:
        raise PolicyError(f"unknown field(s) in {where}: {unknown}; known: ['mask', 'value']")
    if "value" not in value:
        raise PolicyError(f"{where} needs a value")
    raw_value = _hex(value["value"], f"{where}.value", _U64_SIZE)
    raw_mask = (
        _hex(value["mask"], f"{where}.mask", _U64_SIZE) if "mask" in value else b"\xff" * _U64_SIZE
    )
    return MaskedBytes(raw_value, raw_mask)
