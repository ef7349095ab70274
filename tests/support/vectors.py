"""The real attestation vectors shipped with the tests (tests/assets/attestation-vectors).

They are part of the repository, so nothing here skips: a missing manifest is a broken
checkout, and every test that reads a vector fails loudly instead of passing vacuously."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).resolve().parents[1] / "assets" / "attestation-vectors"
MANIFEST = VECTORS / "manifest.json"


@cache
def _manifest() -> tuple[dict[str, Any], ...]:
    if not MANIFEST.is_file():
        raise FileNotFoundError(f"attestation vectors missing from the checkout: {MANIFEST}")
    return tuple(json.loads(MANIFEST.read_text()))


def cases(kind: str) -> list[dict[str, Any]]:
    return [dict(c) for c in _manifest() if c["kind"] == kind]


def cases_all() -> list[dict[str, Any]]:
    return [dict(c) for c in _manifest()]


def case(case_id: str) -> dict[str, Any]:
    found = [c for c in _manifest() if c["id"] == case_id]
    if len(found) != 1:
        raise KeyError(f"no attestation vector {case_id!r} in {MANIFEST}")
    return dict(found[0])


def path(case: dict[str, Any], key: str) -> Path:
    return VECTORS / case[key]


def case_ids(kind: str) -> list[str]:
    return [c["id"] for c in cases(kind)]


def case_params(kind: str) -> list[Any]:
    return [pytest.param(c, id=c["id"]) for c in cases(kind)]
