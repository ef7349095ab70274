"""Typed reads of policy values, shared by every policy section: each raises PolicyError
naming the field, so a malformed policy never reaches validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blindinfer.errors import PolicyError


def int_value(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{where} values are integers")
    return value


def bool_value(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{where} is true or false")
    return value


def str_value(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{where} values are strings")
    return value


def no_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise PolicyError(f"unknown field(s) in {where}: {unknown}; known: {sorted(known)}")


def table_value(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where} must be a table")
    return value


def list_value(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def hex_value(value: object, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise PolicyError(f"{where} values are hex strings")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise PolicyError(f"{where}: {value[:80]!r} is not hex") from exc
