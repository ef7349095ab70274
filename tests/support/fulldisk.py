"""A real full disk for tests: a small tmpfs, and a filler file that takes its last byte.

Why a real filesystem and not a patched `os.write`: what must hold on a full disk (a
delete still commits, the audit log recovers, nothing half-written stays) depends on how
the kernel fails writes (short writes, then ENOSPC, page by page), which a mock would
only imitate. Mounting needs CAP_SYS_ADMIN: tests that use it are skipped without it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(size_bytes: int) -> Iterator[Path]:
    """A fresh tmpfs of `size_bytes` (mode 0700), unmounted afterwards."""
    mountpoint = Path(tempfile.mkdtemp(prefix="blindinfer-fulldisk-"))
    mount = shutil.which("mount")
    if mount is None:
        mountpoint.rmdir()
        pytest.skip("no mount command: cannot make a small filesystem to fill")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        mountpoint.rmdir()
        pytest.skip("mounting a small tmpfs needs CAP_SYS_ADMIN (root)")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def fill(directory: Path, name: str = "filler") -> Path:
    """Writes `directory/name` until the filesystem refuses another byte; returns it.

    Large chunks first, then single bytes, so that even the filler's last page is full:
    after this, any write that needs a new page fails with ENOSPC."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            block = bytes(chunk)
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return path


def make_room(filler: Path) -> None:
    """Gives the filler's space back: the disk has room again."""
    filler.unlink()
