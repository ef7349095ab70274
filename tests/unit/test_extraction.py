"""Where a worker extracts a generative model: /dev/shm when it has room, else disk.

Containers often give /dev/shm 64 MiB: a model larger than its free space must go to the
temp directory instead of failing half-way (ENOSPC). Checked against real file systems'
free space (os.statvfs), never a mocked one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blindinfer.runtime.extraction import MARGIN_BYTES, SHM, extraction_parent, free_bytes


def test_free_bytes_is_what_statvfs_says_an_unprivileged_writer_has(tmp_path: Path) -> None:
    stats = os.statvfs(tmp_path)
    free = free_bytes(str(tmp_path))
    assert free is not None
    # the disk is shared: allow what others write meanwhile
    assert abs(free - stats.f_bavail * stats.f_frsize) < 1 << 30
    assert free_bytes(str(tmp_path / "missing")) is None


def test_a_model_that_fits_goes_to_memory(tmp_path: Path) -> None:
    assert extraction_parent(1, shm=str(tmp_path), margin_bytes=0) == str(tmp_path)
    assert extraction_parent(0, shm=str(tmp_path)) in (str(tmp_path), None)


def test_a_model_larger_than_the_free_space_falls_back_to_disk(tmp_path: Path) -> None:
    free = free_bytes(str(tmp_path))
    assert free is not None
    assert extraction_parent(free * 2 + (1 << 30), shm=str(tmp_path)) is None


def test_the_margin_counts(tmp_path: Path) -> None:
    """A model that fits only by eating the margin (the staging folder, others' use of
    /dev/shm) goes to disk too."""
    free = free_bytes(str(tmp_path))
    assert free is not None
    assert extraction_parent(1, shm=str(tmp_path), margin_bytes=free * 2 + (1 << 30)) is None


def test_a_missing_or_unusable_shm_means_disk(tmp_path: Path) -> None:
    assert extraction_parent(1, shm=str(tmp_path / "missing")) is None
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    assert extraction_parent(1, shm=str(a_file)) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only folder")
def test_a_read_only_shm_means_disk(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        assert extraction_parent(1, shm=str(tmp_path), margin_bytes=0) is None
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir(SHM), reason="no /dev/shm here")
def test_the_real_dev_shm_is_judged_by_its_own_free_space() -> None:
    """A 64 MiB /dev/shm (Docker's default) refuses a 100 MB model; here, whatever its
    size, a model one byte beyond its free space goes to disk."""
    free = free_bytes(SHM)
    assert free is not None
    assert extraction_parent(free + 1) is None
    assert extraction_parent(free - MARGIN_BYTES + (1 << 20)) is None  # eats the margin
    if free > MARGIN_BYTES + (64 << 20) and os.access(SHM, os.W_OK | os.X_OK):
        assert extraction_parent(1 << 20) == SHM
