"""Argument types and the parser class of the `blindinfer` command line.

Every value a user types is checked here, at parse time, so that a mistake (an `http://`
URL, a missing file, `--at yesterday`, `8X` bytes) is answered by one line naming the
option, with exit status 2, before anything is started or contacted. Argparse only, so the
client commands keep working where the server is not installed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from blindinfer.cli.errors import EXIT_USAGE
from blindinfer.errors import UsageError
from blindinfer.sizes import SIZE_HELP as SIZE_HELP
from blindinfer.sizes import SIZE_UNITS as SIZE_UNITS
from blindinfer.sizes import format_size as format_size
from blindinfer.sizes import human_size as human_size
from blindinfer.sizes import parse_size as parse_size

TIME_FORMATS = (
    "Unix seconds (1752919234) or ISO 8601: a date (2025-07-19) or a date and time "
    "(2025-07-19T10:00:34Z)"
)


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
    """argparse type for a blindinfer server URL: the client's own rule (`check_url`:
    https://host[:port] only), so the CLI and `connect()` accept and refuse the same URLs."""
    from blindinfer.client.transport import check_url

    try:
        return check_url(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def kbs_resource(text: str) -> object:
    """argparse type for `serve --store-key-resource`: a `KbsResource` (kbs:///REPO/TYPE/TAG)."""
    from blindinfer.store.key_release import KbsResource

    try:
        return KbsResource.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError("; ".join(str(exc).splitlines())) from None


def cdh_url(text: str) -> str:
    """argparse type for `serve --cdh-url`: http:// to a loopback address only."""
    from blindinfer.store.key_release import check_cdh_url

    try:
        return check_cdh_url(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError("; ".join(str(exc).splitlines())) from None


def aa_url(text: str) -> str:
    """argparse type for `serve --aa-url`: http:// to a loopback address only."""
    from blindinfer.tee.coco_agent import check_aa_url

    try:
        return check_aa_url(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError("; ".join(str(exc).splitlines())) from None


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


def model_path(what: str = "model file") -> Callable[[str], Path]:
    """`readable_file`, or a generative model folder (a directory with genai_config.json,
    checked in full by `ModelFolder.open` when it is uploaded)."""

    def check(text: str) -> Path:
        path = Path(text)
        if (path / "genai_config.json").is_file():
            return path
        return _check_readable(path, what)

    check.__name__ = what
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
