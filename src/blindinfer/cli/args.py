"""Argument types and the parser class of the `blindinfer` command line.

Every value a user types is checked here, at parse time, so that a mistake (an `http://`
URL, a missing file, `--at yesterday`, `8X` bytes) is answered by one line naming the
option, with exit status 2, before anything is started or contacted. Argparse only, so the
client commands keep working where the server is not installed.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from blindinfer.cli.errors import EXIT_USAGE

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*(?:([kmgt])(i?b)?|(b))?\s*$", re.IGNORECASE)
SIZE_HELP = "a byte count with an optional K, M, G or T suffix (1024-based), e.g. 512M or 8G"
TIME_FORMATS = (
    "Unix seconds (1752919234) or ISO 8601: a date (2025-07-19) or a date and time "
    "(2025-07-19T10:00:34Z)"
)


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
    """A rounded size for tables (`1.5 MiB`)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def size(text: str) -> int:
    """argparse type for byte-size options."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def port(text: str) -> int:
    """argparse type for a TCP port to listen on (0: any free port)."""
    if not text.strip().isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid port {text!r}: expected a number from 1 to 65535 (0: any free port)"
        )
    return int(text)


def https_url(text: str) -> str:
    """argparse type for a blindinfer server URL: https://host[:port] only."""
    if "://" not in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no scheme: use https://{text.lstrip('/') or 'host:port'}"
        )
    parts = urlsplit(text)
    if parts.scheme.lower() != "https":
        rest = text.split("://", 1)[1]
        raise argparse.ArgumentTypeError(
            f"{text!r} is not https: blindinfer only talks attested TLS, use https://{rest}"
        )
    try:
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} has an invalid port: use https://host:port with a port from 1 to 65535"
        ) from None
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} names no host: use https://host:port")
    return text


def parse_time(text: str) -> int:
    """`--at`: Unix seconds or ISO 8601, with a message listing both on anything else."""
    from blindinfer.attestation.offline import parse_time as parse

    try:
        return parse(text.strip())
    except ValueError:
        raise ValueError(f"invalid time {text!r}: expected {TIME_FORMATS}") from None


def time_value(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_readable(path: Path, what: str) -> Path:
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r} is not readable (permissions)")
    return path


def readable_file(what: str = "file") -> Callable[[str], Path]:
    """argparse type for a file that must exist and be readable; `what` names it in the
    message ("model file 'x.onnx' does not exist")."""

    def check(text: str) -> Path:
        return _check_readable(Path(text), what)

    check.__name__ = what  # argparse names the type in its fallback message
    return check


def directory_or_new(what: str) -> Callable[[str], str]:
    """A directory that exists, or one that can be created (not an existing file)."""

    def check(text: str) -> str:
        path = Path(text)
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{what} {text!r} is a file, not a directory")
        return text

    check.__name__ = what
    return check


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help, unless the help already says it or the
    option has none worth showing (None, False, a suppressed value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        shown = format_size(default) if action.type is size and isinstance(default, int) else None
        return f"{text} (default: {shown if shown is not None else '%(default)s'})"


class Parser(argparse.ArgumentParser):
    """Errors in two lines (what is wrong, where the help is) instead of the whole usage,
    which for `serve` is a screenful."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USAGE,
            f"{self.prog}: {message}\nrun '{self.prog} --help' for the options and their values\n",
        )
