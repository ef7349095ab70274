"""The one strict JSON decoder of the wire codecs.

Every JSON body that comes off the wire (OIP inference, the OpenAI-compatible API, OIP
generate) is decoded here, so that one set of rules holds everywhere:

- UTF-8 only, a single JSON value, and no repeated key in an object: parsers disagree on
  which duplicate wins, and such an ambiguity lets a proxy and the server read two
  different requests from the same bytes.
- Nesting too deep and integers with too many digits (Python's `int` digit limit) are
  refused as malformed, never leaked as RecursionError or ValueError.
- `allow_nan=False` refuses the non-standard constants `NaN`, `Infinity`, `-Infinity`
  and numbers that overflow a float (`1e400` would otherwise become `inf`). The OIP
  tensor codec allows them (a float tensor may hold them); the generative APIs do not.

The caller bounds the byte length before calling: this module never sees unbounded input.
Every failure is `ProtocolError("malformed_json")`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from blindinfer.errors import ProtocolError
from blindinfer.protocol.shown import shown

__all__ = ["MALFORMED_JSON", "loads"]

MALFORMED_JSON: Final = "malformed_json"


class _DuplicateKeyError(ValueError):
    """Raised from the JSON object hook; converted to ProtocolError by `loads`."""


class _NonFiniteError(ValueError):
    """Raised for NaN/Infinity or a float overflow when they are not allowed."""


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, refusing repeated keys (parsers disagree on which one wins)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(f"duplicate key {shown(key)}")
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> float:
    raise _NonFiniteError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFiniteError(f"the number {shown(text)} is out of range")
    return value


def loads(raw: bytes, *, allow_nan: bool = True) -> object:
    """Decode bounded JSON bytes; every failure becomes ProtocolError("malformed_json")."""
    try:
        text = raw.decode("utf-8")
        if allow_nan:
            return json.loads(text, object_pairs_hook=_object_pairs)
        return json.loads(
            text,
            object_pairs_hook=_object_pairs,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
        )
    except UnicodeDecodeError as exc:
        raise ProtocolError(MALFORMED_JSON, f"JSON is not valid UTF-8: {exc.reason}") from exc
    except RecursionError as exc:
        raise ProtocolError(MALFORMED_JSON, "JSON is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, duplicate keys, int digit limit, NaN
        raise ProtocolError(MALFORMED_JSON, f"invalid JSON: {shown(str(exc))}") from exc
