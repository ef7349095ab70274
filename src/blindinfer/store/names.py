"""Model names, ids and hashes live in disjoint syntactic spaces.

A reference in a URL can then be resolved without ambiguity: a 64-hex string is a
SHA-256, `m-` followed by 32 hex digits is a model_id, anything else is a name.
"""

from __future__ import annotations

import re
import secrets

from blindinfer.store.errors import InvalidModelNameError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def new_model_id() -> str:
    return "m-" + secrets.token_hex(16)


def is_model_id(ref: str) -> bool:
    return _MODEL_ID.fullmatch(ref) is not None


def is_sha256(ref: str) -> bool:
    return _SHA256.fullmatch(ref) is not None


def check_name(name: str) -> str:
    if _NAME.fullmatch(name) is None:
        raise InvalidModelNameError(
            "a model name is 1-128 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    if is_model_id(name) or is_sha256(name):
        raise InvalidModelNameError("a model name must not look like a model_id or a SHA-256 hash")
    return name
