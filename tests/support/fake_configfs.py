"""A fake configfs-tsm that behaves like the kernel's, serving real evidence bytes.

`FakeConfigfs` is a `TsmFs` over a real temporary folder: mkdir creates the entry's
attributes (provider, generation 0, outblob, auxblob) the way configfs does, writes to
inblob/privlevel bump `generation`, write-only attributes cannot be read, and rmdir
removes the entry (what it held is kept in `removed` for the tests to look at).
"""

from __future__ import annotations

import errno
import shutil
import struct
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from support.vectors import VECTORS


def vector(rel: str) -> bytes:
    return (VECTORS / rel).read_bytes()


def cert_table(entries: list[tuple[uuid.UUID, bytes]], pad_to: int = 0) -> bytes:
    """A GHCB cert_table written independently of the parser: header, zero entry, blobs."""
    header_size = 24 * (len(entries) + 1)
    header, body = b"", b""
    for guid, der in entries:
        header += guid.bytes + struct.pack("<II", header_size + len(body), len(der))
        body += der
    blob = header + bytes(24) + body
    return blob + bytes(max(0, pad_to - len(blob)))


def ask_ark() -> tuple[bytes, bytes]:
    ask, ark = x509.load_pem_x509_certificates(vector("files/go-sev-guest/ask_ark_milan.pem"))
    return ask.public_bytes(Encoding.DER), ark.public_bytes(Encoding.DER)


class FakeConfigfs:
    """A `TsmFs` that behaves like configfs-tsm for one provider."""

    def __init__(self, provider: str, outblob: bytes, auxblob: bytes | None = None) -> None:
        self.provider = provider
        self.outblob = outblob
        self.auxblob = auxblob
        self.created: list[str] = []
        self.removed: dict[str, dict[str, bytes]] = {}
        self.interfere = 0  # how many entries get a concurrent write while generating

    def make_entry(self, root: Path, name: str) -> Path:
        entry = root / name
        entry.mkdir()  # raises FileNotFoundError like mkdir(2) if root is missing
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "generation").write_text("0\n")
        (entry / "privlevel_floor").write_text("0\n")
        (entry / "outblob").write_bytes(self.outblob)
        if self.auxblob is not None:
            (entry / "auxblob").write_bytes(self.auxblob)
        self.created.append(name)
        return entry

    def remove_entry(self, entry: Path) -> None:
        self.removed[entry.name] = {p.name: p.read_bytes() for p in entry.iterdir()}
        shutil.rmtree(entry)

    def _bump(self, entry: Path) -> None:
        gen = entry / "generation"
        gen.write_text(f"{int(gen.read_text()) + 1}\n")

    def read(self, path: Path, limit: int) -> bytes:
        if path.name in ("inblob", "privlevel"):
            raise PermissionError(errno.EACCES, "write-only attribute", str(path))
        if path.name == "outblob" and self.interfere > 0:
            self.interfere -= 1
            self._bump(path.parent)  # another process wrote inblob meanwhile
        data = path.read_bytes()
        assert len(data) <= limit
        return data

    def write(self, path: Path, data: bytes) -> None:
        if path.name not in ("inblob", "privlevel"):
            raise PermissionError(errno.EACCES, "read-only attribute", str(path))
        if path.name == "inblob" and len(data) > 64:
            raise OSError(errno.EINVAL, "inblob too large", str(path))
        path.write_bytes(data)
        self._bump(path.parent)

    def exists(self, path: Path) -> bool:
        return path.exists()


class VectorCollateral:
    def __init__(self, text: str) -> None:
        self.text = text
        self.quotes: list[bytes] = []

    def collateral_json(self, quote: bytes) -> str:
        self.quotes.append(quote)
        return self.text
