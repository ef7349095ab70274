"""Binary layouts written once: a table of fixed-size fields drives both parsing and
serialising, so the two can never disagree. Integers are unsigned little-endian.

Used by the SGX/TDX quote and NVIDIA SPDM parsers. Tables are checked at import: a gap, an
overlap or an integer of an odd width is a programming error, not a runtime surprise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INT_WIDTHS = frozenset({1, 2, 3, 4, 8})


@dataclass(frozen=True, slots=True)
class Field:
    """One fixed-size field: an unsigned little-endian integer (`is_int`) or raw bytes."""

    name: str
    offset: int
    size: int
    is_int: bool = False


def uint(name: str, offset: int, size: int) -> Field:
    return Field(name, offset, size, is_int=True)


def raw(name: str, offset: int, size: int) -> Field:
    return Field(name, offset, size)


def check_table(table: tuple[Field, ...], total: int) -> int:
    """`total` if the table covers exactly [0, total) without gaps; fails at import else."""
    pos = 0
    for f in table:
        if f.offset != pos or f.size <= 0 or (f.is_int and f.size not in INT_WIDTHS):
            raise RuntimeError(f"layout table broken at field {f.name!r}")
        pos += f.size
    if pos != total:
        raise RuntimeError(f"layout table covers {pos} bytes, expected {total}")
    return total


def decode(table: tuple[Field, ...], data: bytes | memoryview, base: int) -> dict[str, Any]:
    """Every field of `table` read from `data` at `base` (the caller checked the length)."""
    out: dict[str, Any] = {}
    for f in table:
        chunk = bytes(data[base + f.offset : base + f.offset + f.size])
        out[f.name] = int.from_bytes(chunk, "little") if f.is_int else chunk
    return out


def encode(table: tuple[Field, ...], values: Mapping[str, Any] | object) -> bytes:
    """The fields of `values` (a mapping or an object) in the order and sizes of `table`."""
    parts: list[bytes] = []
    for f in table:
        value = values[f.name] if isinstance(values, Mapping) else getattr(values, f.name)
        parts.append(value.to_bytes(f.size, "little") if f.is_int else value)
    return b"".join(parts)


def check_fields(table: tuple[Field, ...], obj: object, skip: frozenset[str] = frozenset()) -> None:
    """Refuses wrongly sized values at construction, so serialising cannot emit garbage."""
    for f in table:
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if f.is_int:
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value < 1 << (8 * f.size)
            ):
                raise ValueError(f"{f.name} must be an unsigned {8 * f.size}-bit integer")
        elif not isinstance(value, bytes) or len(value) != f.size:
            raise ValueError(f"{f.name} must be {f.size} bytes")
