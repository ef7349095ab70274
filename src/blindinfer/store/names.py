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


ANONYMOUS_NAME = "_"
"""Uploading to this name names the model after its model_id (the server's routes)."""
_SHOWN_NAME_CHARS = 64


def check_name(name: str) -> str:
    """`name` if it may name a model, else InvalidModelNameError saying, for a person, what
    names may be (the message is what an upload with a bad name answers)."""
    if _NAME.fullmatch(name) is not None and not (is_model_id(name) or is_sha256(name)):
        return name
    shown = repr(name[:_SHOWN_NAME_CHARS]) + ("..." if len(name) > _SHOWN_NAME_CHARS else "")
    if is_model_id(name) or is_sha256(name):
        raise InvalidModelNameError(
            f"{shown} cannot be a model name: it has the form of a model_id ('m-' and 32 "
            "hexadecimal digits) or of a SHA-256 (64 hexadecimal digits), by which models "
            "are also referred to; choose a name of another form"
        )
    raise InvalidModelNameError(
        f"{shown} is not a valid model name: a name has 1 to 128 characters, each a letter "
        "(A-Z, a-z), a digit, '_', '.' or '-', and starts with a letter or digit, e.g. "
        f"'classifier-v2'; or upload to {ANONYMOUS_NAME!r} to have the model named after its "
        "model_id"
    )
