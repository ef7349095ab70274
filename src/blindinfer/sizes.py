"""Byte sizes as people write and read them: `8G` in, `87.0 MiB` out (binary units).

Shared by the command line (parsing its size options) and the server (its limit messages);
it imports nothing of either.
"""

from __future__ import annotations

import re

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*(?:([kmgt])(i?b)?|(b))?\s*$", re.IGNORECASE)
SIZE_HELP = "a byte count with an optional K, M, G or T suffix (1024-based), e.g. 512M or 8G"


def parse_size(text: str) -> int:
    """`8G`, `512M`, `64k`, `1024`, `8GiB`, `8gb`: a whole number of bytes, binary units.

    Raises ValueError, whose message says what is accepted, for anything else (decimals,
    negative numbers, unknown suffixes)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected {SIZE_HELP}")
    number, unit = match.group(1), (match.group(2) or "").lower()
    return int(number) * SIZE_UNITS[unit]


def format_size(size: int) -> str:
    """The shortest exact spelling that parse_size reads back (`512M`), for help texts."""
    for unit in ("T", "G", "M", "K"):
        factor = SIZE_UNITS[unit.lower()]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def human_size(size: int) -> str:
    """`size` bytes in binary units, for messages: '512 bytes', '8.0 MiB'."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
