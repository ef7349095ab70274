"""A generative model folder, checked on the client and streamed as one archive.

`ModelFolder.open(path)` applies the server's own rules before a byte is sent (the same
`model_archive` and `genai_config` code the server runs), so that a folder that is not an
onnxruntime-genai model folder is a `UsageError` naming the file and what is wrong, not a
refused upload after minutes of streaming. The archive's length is known up front (the
upload's Content-Length, which lets the server refuse an oversized model before reading it),
and `chunks()` streams files in pieces, never holding a whole weight file in memory.

The archive format and its rationale: `blindinfer.protocol.model_archive`, docs/generative.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blindinfer.errors import ProtocolError, UsageError
from blindinfer.protocol.genai_config import ConfigLimits, GenaiConfig, parse_genai_config
from blindinfer.protocol.model_archive import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    ArchiveLimits,
    FolderArchive,
)

__all__ = ["ModelFolder"]


@dataclass(frozen=True, slots=True)
class ModelFolder:
    """A checked model folder: its archive plan and its parsed genai_config.json."""

    archive: FolderArchive
    config: GenaiConfig

    @property
    def size(self) -> int:
        """The archive's exact length in bytes."""
        return self.archive.size

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        limits: ArchiveLimits | None = None,
        config_limits: ConfigLimits | None = None,
    ) -> ModelFolder:
        """Check `path` as the server would; raise UsageError saying what to fix."""
        folder = Path(path)
        if not folder.is_dir():
            raise UsageError(
                f"{folder} is not a directory: a generative model is an onnxruntime-genai "
                "model folder (genai_config.json, the .onnx decoder and its weights, "
                "tokenizer.json, tokenizer_config.json)"
            )
        try:
            archive = FolderArchive.plan(folder, limits)
            fd = os.open(folder / CONFIG_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                raw = os.read(fd, MAX_CONFIG_BYTES + 1)
            finally:
                os.close(fd)
            config = parse_genai_config(
                raw, entries=[name for name, _ in archive.files], limits=config_limits
            )
        except ProtocolError as exc:
            raise UsageError(
                f"{folder} is not a generative model folder blindinfer accepts: {exc.message}"
            ) from exc
        except OSError as exc:
            raise UsageError(f"cannot read the model folder {folder}: {exc.strerror}") from exc
        return cls(archive, config)

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The archive's bytes; a file that changed since `open` is a UsageError."""
        try:
            yield from self.archive.chunks(chunk_size)
        except ProtocolError as exc:
            raise UsageError(f"{self.archive.folder}: {exc.message}; upload again") from exc
        except OSError as exc:
            raise UsageError(
                f"cannot read the model folder {self.archive.folder}: {exc.strerror}"
            ) from exc
