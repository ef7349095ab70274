"""The shared real attestation vectors (../shared/attestation-vectors), if present."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "attestation-vectors"


def cases(kind: str) -> list[dict[str, Any]]:
    manifest = VECTORS / "manifest.json"
    if not manifest.is_file():
        return []
    return [c for c in json.loads(manifest.read_text()) if c["kind"] == kind]


def cases_all() -> list[dict[str, Any]]:
    manifest = VECTORS / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else []


def path(case: dict[str, Any], key: str) -> Path:
    return VECTORS / case[key]


def require_vectors() -> None:
    if not (VECTORS / "manifest.json").is_file():
        pytest.skip(f"attestation vectors not present at {VECTORS}")


def case_ids(kind: str) -> list[str]:
    return [c["id"] for c in cases(kind)] or ["absent"]


def case_params(kind: str) -> list[Any]:
    found = cases(kind)
    if not found:
        return [
            pytest.param(
                None, marks=pytest.mark.skip(reason=f"attestation vectors not present at {VECTORS}")
            )
        ]
    return [pytest.param(c, id=c["id"]) for c in found]
