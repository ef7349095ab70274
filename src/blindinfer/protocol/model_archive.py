"""The archive a generative model folder travels in: a canonical, strict subset of ustar.

An onnxruntime-genai model is a folder (`genai_config.json`, the ONNX decoder and its external
weights, `tokenizer.json`, `tokenizer_config.json`, a chat template), but the sealed store
keeps one blob per model and an upload is one stream. The folder therefore travels as one
archive, parsed here once, at the edge, into typed entries.

Why this format:

- POSIX ustar tar, uncompressed. Weights do not compress (fp32 barely, int4 not at all), and
  a compressed stream is a decompression bomb: its declared sizes mean nothing until it is
  inflated. Uncompressed, every size is in a header and is checked before a data byte is
  read, and the archive is only 512 bytes per file larger than the folder.
- A *subset* read by our own streaming parser, not Python's `tarfile`: `tarfile` follows
  pax and GNU extensions (headers that rewrite the next entry's name, size or type), long
  names, links, devices, sparse maps and directories, each one a way to make the name
  checked differ from the name written. Here exactly one header layout exists: a regular
  file (typeflag `0`), `ustar\\0` magic and version `00`, a verified checksum, a flat name
  in the 100-byte name field (empty prefix, empty link name), and fixed metadata.
- Canonical: names strictly ascending (bytewise), mode 0644, uid/gid 0, mtime 0, empty
  owner names and device numbers, zero padding: byte for byte what Python's `tarfile`
  writes in USTAR format for such members (the tests check it). One folder has exactly one
  archive as `write_archive`/`FolderArchive` write it, so the model's hash (the hash of the
  stream) is a function of the file names and contents alone: anyone can recompute it from
  the folder. The only slack the parser tolerates is zero padding after the end marker (at
  most one 10240-byte tar record, as `tar` pads), which carries nothing; our writer adds none.
- Names are flat, ASCII `[A-Za-z0-9][A-Za-z0-9._-]*`, without `..`, at most 100 bytes, from
  an allow-list of what an onnxruntime-genai folder holds (what its model builder and the
  Hugging Face tokenizer save): `genai_config.json` (at most 64 KiB), tokenizer and chat
  template files (at most `max_metadata_bytes` each), and `*.onnx` / `*.onnx.data` /
  `*.onnx_data` / `*.data` weights (at most `max_entry_bytes` each). The archive must hold
  `genai_config.json`, `tokenizer.json`, `tokenizer_config.json` and at least one `.onnx`.

`ArchiveParser` works on chunks of any size (a streaming upload) and returns, per chunk,
`ArchiveEntry` events (a header accepted: name, size, data offset) and `EntryChunk` events
(a piece of that entry's data); `finish()` checks the end marker and the required files and
returns the `ModelArchive` (the entries, and the bytes of `genai_config.json`). Every size
is checked against `ArchiveLimits` when its header arrives, before its data is read. Every
problem is a `ModelArchiveError` (a `ProtocolError`, so the server answers 400
"invalid_model_archive") naming the entry and what is wrong; `reason` is machine-readable.

`FolderArchive` writes the archive from a folder (client side): its size is known before the
first byte (Content-Length), and `chunks()` streams files without reading one whole into
memory. `extract_archive` writes a (re-parsed) archive into a fresh directory, every file
created with O_EXCL|O_NOFOLLOW and mode 0600 relative to the directory's descriptor.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from blindinfer.errors import ProtocolError
from blindinfer.protocol.shown import shown

__all__ = [
    "BLOCK_SIZE",
    "CONFIG_NAME",
    "MAX_CONFIG_BYTES",
    "MAX_NAME_LENGTH",
    "RECORD_SIZE",
    "REQUIRED_NAMES",
    "ArchiveEntry",
    "ArchiveLimits",
    "ArchiveParser",
    "EntryChunk",
    "FolderArchive",
    "ModelArchive",
    "ModelArchiveError",
    "archive_size",
    "check_entry_name",
    "encode_header",
    "extract_archive",
    "read_archive",
    "write_archive",
]

BLOCK_SIZE: Final = 512
RECORD_SIZE: Final = 10240
"""tar's default record: writers pad the end of the archive with zeros up to it."""
MAX_NAME_LENGTH: Final = 100
"""The ustar name field; the prefix field (which would add a '/') must stay empty."""
CONFIG_NAME: Final = "genai_config.json"
MAX_CONFIG_BYTES: Final = 64 * 1024
REQUIRED_NAMES: Final = (CONFIG_NAME, "tokenizer.json", "tokenizer_config.json")
ERROR_CODE: Final = "invalid_model_archive"

# What the og model builder writes next to the model (genai_config.json, chat_template.jinja,
# tokenizer.json, tokenizer_config.json) and what Hugging Face tokenizers save for other
# tokenizer kinds (vocab/merges, sentencepiece models, added and special tokens).
METADATA_NAMES: Final = frozenset(
    {
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "generation_config.json",
        "merges.txt",
        "sentencepiece.bpe.model",
        "special_tokens_map.json",
        "spiece.model",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "vocab.json",
        "vocab.txt",
    }
)
WEIGHT_SUFFIXES: Final = (".onnx", ".onnx.data", ".onnx_data", ".data")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")

_MODE: Final = 0o644
_REGULAR: Final = b"0"
_MAGIC: Final = b"ustar\x00"
_VERSION: Final = b"00"
_ZERO_BLOCK: Final = bytes(BLOCK_SIZE)
_MAX_SIZE_FIELD: Final = 8**11 - 1  # 11 octal digits and a NUL, as POSIX writes it

# Which refusal a typeflag gets: each one is a way to make an entry other than a file.
_TYPEFLAGS: Final = {
    b"\x00": ("type", "an old-style (pre-POSIX) file header; write a POSIX ustar archive"),
    b"1": ("link", "a hard link; only regular files are accepted"),
    b"2": ("link", "a symbolic link; only regular files are accepted"),
    b"3": ("device", "a character device; only regular files are accepted"),
    b"4": ("device", "a block device; only regular files are accepted"),
    b"5": ("directory", "a directory; the model folder must be flat"),
    b"6": ("fifo", "a FIFO; only regular files are accepted"),
    b"7": ("type", "a contiguous file; only regular files (type '0') are accepted"),
    b"x": ("pax", "a pax extended header; only plain ustar headers are accepted"),
    b"g": ("pax", "a pax global header; only plain ustar headers are accepted"),
    b"L": ("gnu", "a GNU long-name header; names must fit the 100-byte ustar field"),
    b"K": ("gnu", "a GNU long-link header; links are not accepted"),
    b"S": ("sparse", "a GNU sparse file; only regular files are accepted"),
}


class ModelArchiveError(ProtocolError):
    """A model archive (or folder) that is not a canonical, safe model folder.

    `reason` says what is wrong in one word (`absolute_path`, `link`, `too_large`, ...),
    `entry` which entry (None for the archive as a whole), `detail` what is wrong in words;
    the message says all of it."""

    def __init__(self, reason: str, message: str, entry: str | None = None) -> None:
        self.reason = reason
        self.entry = entry
        self.detail = message
        where = "model archive" if entry is None else f"model archive entry {shown(entry)}"
        super().__init__(ERROR_CODE, f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """Bounds checked from the headers, before any data is read.

    max_total_bytes: file contents over the whole archive (the server's max model bytes).
    max_entry_bytes: one weight file (`.onnx`, `.data`); at most `max_total_bytes`.
    max_metadata_bytes: one tokenizer or chat-template file.
    max_entries: files in the archive.
    """

    max_total_bytes: int = 512 * 1024 * 1024
    max_entry_bytes: int | None = None
    max_metadata_bytes: int = 64 * 1024 * 1024
    max_entries: int = 64

    def __post_init__(self) -> None:
        """Limits are trusted but must be coherent: positive ints."""
        for name in ("max_total_bytes", "max_metadata_bytes", "max_entries"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"ArchiveLimits.{name} must be a positive int, got {value!r}")
        if self.max_entry_bytes is not None and (
            type(self.max_entry_bytes) is not int or self.max_entry_bytes < 1
        ):
            raise ValueError(
                f"ArchiveLimits.max_entry_bytes must be positive: {self.max_entry_bytes!r}"
            )

    def bound(self, name: str) -> int:
        """The most bytes the entry `name` (already checked) may hold."""
        if name == CONFIG_NAME:
            return MAX_CONFIG_BYTES
        if name in METADATA_NAMES:
            return self.max_metadata_bytes
        entry = self.max_total_bytes if self.max_entry_bytes is None else self.max_entry_bytes
        return min(entry, self.max_total_bytes, _MAX_SIZE_FIELD)


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """One accepted file header: its data (`size` bytes) starts at `offset` in the stream."""

    name: str
    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class EntryChunk:
    """A piece of entry `name`'s data, starting at `position` within the entry."""

    name: str
    position: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ModelArchive:
    """A complete, checked archive: its entries in order and the stream's length."""

    entries: tuple[ArchiveEntry, ...]
    size: int
    genai_config: bytes = field(repr=False)
    """The content of `genai_config.json` (at most MAX_CONFIG_BYTES), kept for parsing."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    @property
    def data_bytes(self) -> int:
        """Sum of the files' sizes (what the folder weighs once extracted)."""
        return sum(e.size for e in self.entries)

    def entry(self, name: str) -> ArchiveEntry | None:
        return next((e for e in self.entries if e.name == name), None)


def check_entry_name(name: str) -> str:
    """Return `name` if it may be a file of a model folder; else raise ModelArchiveError.

    Shared by the parser, the folder writer and genai_config (the decoder's filename), so
    that every place that accepts a file name accepts the same ones."""
    if not name:
        raise ModelArchiveError("bad_name", "the name is empty", name)
    if not name.isascii() or not name.isprintable():
        raise ModelArchiveError(
            "bad_name", "names must be printable ASCII (no NUL or control characters)", name
        )
    if len(name) > MAX_NAME_LENGTH:
        raise ModelArchiveError(
            "bad_name", f"the name is longer than {MAX_NAME_LENGTH} characters", name
        )
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise ModelArchiveError("absolute_path", "absolute paths are not accepted", name)
    if ".." in re.split(r"[/\\]", name):
        raise ModelArchiveError("parent_path", "'..' would escape the model folder", name)
    if "/" in name or "\\" in name:
        raise ModelArchiveError(
            "not_flat", "names may not contain '/' or '\\': the model folder is flat", name
        )
    if not _NAME.match(name) or ".." in name:
        raise ModelArchiveError(
            "bad_name",
            "names are letters, digits, '.', '_' and '-', start with a letter or digit and "
            "contain no '..'",
            name,
        )
    if name != CONFIG_NAME and name not in METADATA_NAMES and not name.endswith(WEIGHT_SUFFIXES):
        raise ModelArchiveError(
            "unexpected_file",
            "not a file of an onnxruntime-genai model folder (expected genai_config.json, "
            "tokenizer and chat template files, *.onnx and *.onnx.data / *.data weights)",
            name,
        )
    return name


def _octal(raw: bytes, what: str, name: str | None) -> int:
    """A ustar numeric field: octal digits, then NUL/space terminators to the end."""
    digits = raw.rstrip(b"\x00 ")
    end = len(digits)
    if b"\x00" in digits or b" " in digits or end == len(raw):
        raise ModelArchiveError(
            "bad_header", f"the {what} field is not a terminated octal number", name
        )
    if not digits:
        raise ModelArchiveError("bad_header", f"the {what} field is empty", name)
    if any(not 0x30 <= b <= 0x37 for b in digits):
        raise ModelArchiveError(
            "bad_header",
            f"the {what} field is not octal (base-256 and other forms are refused)",
            name,
        )
    return int(digits, 8)


def _zero(raw: bytes) -> bool:
    return not any(raw)


def _field_name(raw: bytes) -> str:
    """The name field: bytes up to the first NUL, then only NULs."""
    head, _, rest = raw.partition(b"\x00")
    if any(rest):
        raise ModelArchiveError("bad_header", "bytes after the end of the name field's name")
    try:
        return head.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ModelArchiveError("bad_name", f"the name {shown(head)} is not ASCII") from exc


def _parse_header(block: bytes, offset: int) -> tuple[str, int]:
    """Check one non-zero header block; return the entry's name and size."""
    stored = _octal(block[148:156], "checksum", None)
    actual = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored != actual:
        raise ModelArchiveError(
            "bad_checksum", f"the header at byte {offset} has a bad checksum (not a ustar header)"
        )
    if block[257:263] != _MAGIC or block[263:265] != _VERSION:
        raise ModelArchiveError(
            "not_ustar",
            f"the header at byte {offset} is not POSIX ustar (magic 'ustar\\0', version '00')",
        )
    name = _field_name(block[0:100])
    typeflag = block[156:157]
    if typeflag != _REGULAR:
        reason, what = _TYPEFLAGS.get(
            typeflag,
            ("type", f"an entry of type {shown(typeflag)}; only regular files are accepted"),
        )
        raise ModelArchiveError(reason, f"is {what}", name or None)
    if not _zero(block[345:500]):
        prefix = block[345:500].rstrip(b"\x00")
        raise ModelArchiveError(
            "not_flat",
            f"has a path prefix {shown(prefix)}: the model folder is flat",
            name or None,
        )
    if not _zero(block[157:257]):
        raise ModelArchiveError("link", "has a link name; only regular files are accepted", name)
    check_entry_name(name)
    size = _octal(block[124:136], "size", name)
    fixed = (
        ("mode", block[100:108], _MODE),
        ("uid", block[108:116], 0),
        ("gid", block[116:124], 0),
        ("mtime", block[136:148], 0),
    )
    for what, raw, expected in fixed:
        if _octal(raw, what, name) != expected:
            raise ModelArchiveError(
                "not_canonical", f"{what} must be {expected:o} in a canonical archive", name
            )
    if not _zero(block[265:345]):
        raise ModelArchiveError(
            "not_canonical", "owner names and device numbers must be empty", name
        )
    if not _zero(block[500:512]):
        raise ModelArchiveError("bad_header", "the header's padding is not zero", name)
    return name, size


class ArchiveParser:
    """Incremental parser: `feed` chunks of any size, then `finish`.

    States: between entries (collecting a 512-byte header), in an entry's data, in its zero
    padding, after the first and the second zero block of the end marker. A parser that has
    raised stays failed: later calls raise the same error again."""

    def __init__(self, limits: ArchiveLimits | None = None) -> None:
        self._limits = limits or ArchiveLimits()
        self._offset = 0  # bytes consumed
        self._header = bytearray()
        self._entries: list[ArchiveEntry] = []
        self._total = 0
        self._current: ArchiveEntry | None = None
        self._remaining = 0  # data bytes of the current entry still to come
        self._padding = 0  # zero bytes still to come after the current entry
        self._zero_blocks = 0  # 0, 1 or 2 (end marker complete)
        self._trailing = 0  # zero bytes seen after the end marker
        self._config = bytearray()
        self._error: ModelArchiveError | None = None
        self._done = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[ArchiveEntry | EntryChunk]:
        """Consume `chunk`; return the headers accepted and data pieces in it, in order."""
        if self._error is not None:
            raise self._error
        if self._done:
            raise ModelArchiveError("finished", "data fed after finish()")
        try:
            return self._feed(bytes(chunk))
        except ModelArchiveError as exc:
            self._error = exc
            raise

    def _feed(self, data: bytes) -> list[ArchiveEntry | EntryChunk]:
        events: list[ArchiveEntry | EntryChunk] = []
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                take = min(self._remaining, n - i)
                piece = data[i : i + take]
                entry = self._current
                assert entry is not None
                position = entry.size - self._remaining
                if entry.name == CONFIG_NAME:
                    self._config += piece
                events.append(EntryChunk(entry.name, position, piece))
                self._remaining -= take
                i += take
            elif self._padding:
                take = min(self._padding, n - i)
                if any(data[i : i + take]):
                    raise ModelArchiveError(
                        "bad_padding",
                        "the padding after the entry's data is not zero",
                        self._current.name if self._current else None,
                    )
                self._padding -= take
                i += take
            elif self._zero_blocks == 2:
                take = n - i
                if any(data[i:]) or self._trailing + take > RECORD_SIZE:
                    raise ModelArchiveError(
                        "trailing_data",
                        "data after the end-of-archive marker (only zero padding up to "
                        f"{RECORD_SIZE} bytes may follow it)",
                    )
                self._trailing += take
                i = n
            else:
                take = min(BLOCK_SIZE - len(self._header), n - i)
                self._header += data[i : i + take]
                i += take
                if len(self._header) == BLOCK_SIZE:
                    block = bytes(self._header)
                    self._header.clear()
                    entry = self._block(block)
                    if entry is not None:
                        events.append(entry)
        return events

    def _block(self, block: bytes) -> ArchiveEntry | None:
        """Handle one complete header-position block."""
        start = self._offset
        self._offset += BLOCK_SIZE
        if block == _ZERO_BLOCK:
            self._zero_blocks += 1
            return None
        if self._zero_blocks:
            raise ModelArchiveError(
                "trailing_data",
                f"a header at byte {start} follows a zero block: the end marker is two zero "
                "blocks and ends the archive",
            )
        name, size = _parse_header(block, start)
        previous = self._entries[-1].name if self._entries else None
        if previous is not None and name.encode() <= previous.encode():
            if name == previous:
                raise ModelArchiveError("duplicate", "appears twice in the archive", name)
            raise ModelArchiveError(
                "not_canonical",
                f"comes after {shown(previous)}: entries must be sorted by name",
                name,
            )
        limits = self._limits
        if len(self._entries) >= limits.max_entries:
            raise ModelArchiveError(
                "too_many_entries", f"more than {limits.max_entries} files in the archive", name
            )
        bound = limits.bound(name)
        if size > bound:
            raise ModelArchiveError(
                "too_large", f"declares {size} bytes, more than the limit of {bound}", name
            )
        if self._total + size > limits.max_total_bytes:
            raise ModelArchiveError(
                "total_too_large",
                f"brings the files to {self._total + size} bytes, more than the limit of "
                f"{limits.max_total_bytes}",
                name,
            )
        entry = ArchiveEntry(name, size, self._offset)
        self._entries.append(entry)
        self._total += size
        self._current = entry
        self._remaining = size
        self._padding = -size % BLOCK_SIZE
        self._offset += size + self._padding
        return entry

    def finish(self) -> ModelArchive:
        """The end of the stream: the end marker and required files must be there."""
        if self._error is not None:
            raise self._error
        try:
            return self._finish()
        except ModelArchiveError as exc:
            self._error = exc
            raise

    def _finish(self) -> ModelArchive:
        if self._remaining or self._padding or self._header or self._zero_blocks < 2:
            inside = self._remaining or self._padding
            where = self._current.name if inside and self._current else None
            raise ModelArchiveError(
                "truncated",
                "the archive ends early (an entry's data or the two zero blocks of the end "
                "marker are missing)",
                where,
            )
        _check_required(e.name for e in self._entries)
        self._done = True
        return ModelArchive(
            tuple(self._entries), self._offset + self._trailing, bytes(self._config)
        )


def _check_required(entries: Iterable[str]) -> None:
    names = set(entries)
    for required in REQUIRED_NAMES:
        if required not in names:
            raise ModelArchiveError(
                "missing_file", "is required in a generative model folder", required
            )
    if not any(n.endswith(".onnx") for n in names):
        raise ModelArchiveError("missing_file", "the model folder holds no .onnx model", "*.onnx")


def read_archive(chunks: Iterable[bytes], limits: ArchiveLimits | None = None) -> ModelArchive:
    """Check a whole archive stream without keeping its data (except genai_config.json)."""
    parser = ArchiveParser(limits)
    for chunk in chunks:
        parser.feed(chunk)
    return parser.finish()


def encode_header(name: str, size: int) -> bytes:
    """The canonical ustar header of a regular file (the name is checked first)."""
    check_entry_name(name)
    if not 0 <= size <= _MAX_SIZE_FIELD:
        raise ModelArchiveError("too_large", f"{size} bytes do not fit a ustar header", name)
    block = bytearray(BLOCK_SIZE)
    block[0 : len(name)] = name.encode("ascii")
    block[100:108] = b"%07o\x00" % _MODE
    block[108:116] = b"%07o\x00" % 0
    block[116:124] = b"%07o\x00" % 0
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"%011o\x00" % 0
    block[148:156] = b" " * 8
    block[156:157] = _REGULAR
    block[257:263] = _MAGIC
    block[263:265] = _VERSION
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def archive_size(sizes: Iterable[int]) -> int:
    """The archive's exact length for files of these sizes (known before writing it)."""
    return sum(BLOCK_SIZE + size + (-size % BLOCK_SIZE) for size in sizes) + 2 * BLOCK_SIZE


def write_archive(files: Mapping[str, bytes]) -> bytes:
    """The canonical archive of in-memory files (small models and tests)."""
    parts: list[bytes] = []
    for name in sorted(files, key=lambda n: n.encode()):
        data = files[name]
        parts += [encode_header(name, len(data)), data, bytes(-len(data) % BLOCK_SIZE)]
    parts.append(bytes(2 * BLOCK_SIZE))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class FolderArchive:
    """The archive of a folder on disk, planned before a byte is sent.

    `size` is the exact archive length (for Content-Length); `chunks()` streams it, reading
    each file in pieces and refusing a file that changed (size, or a swap for a link)
    since it was planned. Re-iterable: each call to `chunks()` starts over (retries)."""

    folder: Path
    files: tuple[tuple[str, int], ...]
    size: int

    @classmethod
    def plan(
        cls, folder: str | os.PathLike[str], limits: ArchiveLimits | None = None
    ) -> FolderArchive:
        """Check the folder with the parser's own rules and size the archive.

        Raises ModelArchiveError (what the server would answer) or OSError (unreadable)."""
        limits = limits or ArchiveLimits()
        root = Path(folder)
        files: list[tuple[str, int]] = []
        with os.scandir(root) as it:
            listing = sorted(it, key=lambda e: e.name.encode("utf-8", "surrogateescape"))
        total = 0
        for item in listing:
            name = item.name
            info = item.stat(follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                raise ModelArchiveError("link", "is a symbolic link; copy the file instead", name)
            if stat.S_ISDIR(info.st_mode):
                raise ModelArchiveError(
                    "directory", "is a directory; the model folder must be flat", name
                )
            if not stat.S_ISREG(info.st_mode):
                raise ModelArchiveError("type", "is not a regular file", name)
            check_entry_name(name)
            bound = limits.bound(name)
            if info.st_size > bound:
                raise ModelArchiveError(
                    "too_large", f"has {info.st_size} bytes, more than the limit of {bound}", name
                )
            total += info.st_size
            if total > limits.max_total_bytes:
                raise ModelArchiveError(
                    "total_too_large",
                    f"brings the files to {total} bytes, more than the limit of "
                    f"{limits.max_total_bytes}",
                    name,
                )
            files.append((name, info.st_size))
        if len(files) > limits.max_entries:
            raise ModelArchiveError("too_many_entries", f"more than {limits.max_entries} files")
        _check_required(n for n, _ in files)
        return cls(root, tuple(files), archive_size(s for _, s in files))

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The archive's bytes, in pieces of at most about `chunk_size`."""
        for name, size in self.files:
            yield encode_header(name, size)
            fd = os.open(self.folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_size != size:
                    raise ModelArchiveError("changed", "changed size while being sent", name)
                left = size
                while left:
                    piece = os.read(fd, min(chunk_size, left))
                    if not piece:
                        raise ModelArchiveError("changed", "shrank while being sent", name)
                    left -= len(piece)
                    yield piece
                if os.read(fd, 1):
                    raise ModelArchiveError("changed", "grew while being sent", name)
            finally:
                os.close(fd)
            if size % BLOCK_SIZE:
                yield bytes(-size % BLOCK_SIZE)
        yield bytes(2 * BLOCK_SIZE)


def extract_archive(
    chunks: Iterable[bytes],
    destination: str | os.PathLike[str],
    limits: ArchiveLimits | None = None,
) -> ModelArchive:
    """Parse `chunks` again and write the files into `destination`, a directory that must
    not exist yet (created 0700). Files are created relative to the directory's descriptor
    with O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600, so nothing outside it can be reached or
    overwritten. On any error the directory and what was written are removed."""
    parser = ArchiveParser(limits)
    os.mkdir(destination, 0o700)
    dir_fd = os.open(destination, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    created: list[str] = []
    fd: int | None = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        for chunk in chunks:
            for event in parser.feed(chunk):
                if isinstance(event, ArchiveEntry):
                    if fd is not None:
                        os.close(fd)
                        fd = None
                    fd = os.open(event.name, flags, 0o600, dir_fd=dir_fd)
                    created.append(event.name)
                else:
                    assert fd is not None
                    view = memoryview(event.data)
                    while view:
                        view = view[os.write(fd, view) :]
        archive = parser.finish()
    except BaseException:
        if fd is not None:
            os.close(fd)
            fd = None
        for name in created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
        os.close(dir_fd)
        with contextlib.suppress(OSError):  # not empty: someone else wrote there; keep it
            os.rmdir(destination)
        raise
    if fd is not None:
        os.close(fd)
    os.close(dir_fd)
    return archive
