"""Where a worker extracts a generative model's decrypted files while onnxruntime-genai loads it.

onnxruntime-genai loads a model from a folder, so the decrypted weights have to be files
for the moment of loading (the folder is removed as soon as the session is built). They go
to a private 0700 folder in memory, on `/dev/shm` (tmpfs), whenever it has room for them:
there they never reach a disk. Containers often give `/dev/shm` only 64 MiB (Docker's
default), so the room is checked first, with `os.statvfs`, against the archive's size (the
extracted files are smaller: the archive adds a 512-byte header per file) plus a margin for
the staging folder and whatever else shares `/dev/shm`. Only a model that does not fit
falls back to a private folder in the system temp directory (`$TMPDIR`, else `/tmp`), which
may be a disk: the one case where decrypted weights touch one, and only while the model
loads. Should `/dev/shm` fill up during the extraction anyway (two workers loading at the
same time), the worker retries on disk rather than fail the load (`runtime/workers.py`).
"""

from __future__ import annotations

import os
from typing import Final

SHM: Final = "/dev/shm"  # noqa: S108 - only ever a parent for mkdtemp's fresh 0700 folder
MARGIN_BYTES: Final = 16 << 20
"""Room left free on /dev/shm beyond the archive's size: the staging folder (a rendered
genai_config.json and links), and other users of /dev/shm (semaphores, shared memory)."""


def free_bytes(path: str) -> int | None:
    """Bytes an unprivileged process may still write under `path`; None if unknown."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def extraction_parent(
    archive_bytes: int, *, shm: str = SHM, margin_bytes: int = MARGIN_BYTES
) -> str | None:
    """`shm` if a model whose archive has `archive_bytes` fits there with `margin_bytes`
    to spare (and the folder is usable); else None: the system temp directory (disk)."""
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK | os.X_OK):
        return None
    free = free_bytes(shm)
    if free is None or free < max(0, archive_bytes) + margin_bytes:
        return None
    return shm


__all__ = ["MARGIN_BYTES", "SHM", "extraction_parent", "free_bytes"]
