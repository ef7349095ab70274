"""The proxy's local access token (`--access-token-file`): for users who share the machine.

A loopback TCP port is open to every local user and process. With a token, a request must
carry it in `X-Blindinfer-Proxy-Token`; only who can read the file (0600, its owner) can.
An existing file is used as it is (so clients can be configured once); a missing one is
created with a fresh random token, with mode 0600 from the start.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

MIN_TOKEN_CHARACTERS = 16


class TokenFileError(ValueError):
    """The token file cannot be used (readable by others, too short, not a file)."""


def load_or_create_token(path: str | os.PathLike[str]) -> str:
    """The token in `path`, created (0600, 32 random bytes, base64url) if missing."""
    target = Path(path)
    try:
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(target)
    token = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(token + "\n")
    return token


def _read(target: Path) -> str:
    info = target.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise TokenFileError(f"{target} is not a regular file")
    if info.st_mode & 0o077:
        raise TokenFileError(
            f"{target} is readable or writable by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}); run chmod 600 on it"
        )
    token = target.read_text(encoding="ascii", errors="replace").strip()
    if len(token) < MIN_TOKEN_CHARACTERS or not token.isascii() or not token.isprintable():
        raise TokenFileError(
            f"{target} must hold a token of at least {MIN_TOKEN_CHARACTERS} printable ASCII "
            "characters (delete it to have one generated)"
        )
    return token


__all__ = ["MIN_TOKEN_CHARACTERS", "TokenFileError", "load_or_create_token"]
