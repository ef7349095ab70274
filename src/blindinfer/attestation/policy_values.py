"""Typed reads of policy values, shared by every policy section: each raises PolicyError
naming the field, so a malformed policy never reaches validation."""

from __future__ import annotations

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
