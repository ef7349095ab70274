"""A bounded repr for error messages: hostile input (huge or deeply nested) cannot blow
up a message or a log line."""

from __future__ import annotations

import reprlib

_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 6, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 48, 40, 48


def shown(value: object) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 64 else text[:61] + "..."
