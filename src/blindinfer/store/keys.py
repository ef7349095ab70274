"""Sealing keys for the sealed store where the platform has none worth using.

`simulation_sealing_key` exists for simulation mode only. Why a random key in a file
rather than `SimulationPlatform.sealing_key()`: that key is derived from MRENCLAVE, which
is a digest of every source file, so every code edit would make a developer's stored
models unreadable; and it is derivable by anyone from public values. The file key
survives edits. Neither protects anything against the host: this one lies in plain text
on the host's disk, next to the data it "seals".
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import Final

from blindinfer.errors import BlindInferError

_log = logging.getLogger(__name__)

SIMULATION_KEY_FILE: Final = "SIMULATION-INSECURE-sealing.key"
KEY_SIZE: Final = 32


class SealingKeyFileError(BlindInferError):
    """The simulation key file exists but is not a 32-byte key (never silently replaced:
    replacing it would make every sealed model unreadable)."""


def simulation_sealing_key(directory: Path) -> bytes:
    """Read `<directory>/SIMULATION-INSECURE-sealing.key`, creating it (0600) if absent.

    Creation is atomic (temp file, fsync, hard link, which fails if another process won
    the race), so no reader ever sees a partial key. Logs a loud warning every time.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / SIMULATION_KEY_FILE
    if not path.exists():
        _create_key_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SealingKeyFileError(f"cannot open the simulation sealing key {path}: {exc}") from exc
    with os.fdopen(fd, "rb") as f:
        key = f.read(KEY_SIZE + 1)
    if len(key) != KEY_SIZE:
        raise SealingKeyFileError(
            f"{path} holds {len(key)} bytes, expected a {KEY_SIZE}-byte key; remove it only "
            "if you accept losing every model sealed with it"
        )
    _log.warning(
        "SIMULATION SEALING KEY IN USE (%s): it is a plain file on the host's disk, so the "
        "sealed model store protects NOTHING against the host, its operator or anyone who "
        "can read that directory. Never store real models in simulation mode.",
        path,
    )
    return key


def _create_key_file(path: Path) -> None:
    tmp = path.with_name(f".tmp-{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_SIZE))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process created it first
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
