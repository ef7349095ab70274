"""The model folder archive: exact format, streaming, extraction, and every attack.

The parser is the edge where an uploaded folder becomes files on the server, so each test
performs one attack with real tar bytes (Python's tarfile writes most of them, the way a
hostile client would) and asserts the exact refusal; fuzzing checks that nothing but
ModelArchiveError ever leaves the parser and that chunk boundaries never change the answer.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.client.model_folder import ModelFolder
from blindinfer.errors import ProtocolError, UsageError
from blindinfer.protocol.model_archive import (
    BLOCK_SIZE,
    MAX_CONFIG_BYTES,
    RECORD_SIZE,
    ArchiveEntry,
    ArchiveLimits,
    ArchiveParser,
    EntryChunk,
    FolderArchive,
    ModelArchive,
    ModelArchiveError,
    archive_size,
    check_entry_name,
    encode_header,
    extract_archive,
    read_archive,
    write_archive,
)

CONFIG = b'{"model": {}}'
FILES: dict[str, bytes] = {
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    "genai_config.json": CONFIG,
    "model.onnx": b"\x08\x07" * 700,
    "model.onnx.data": bytes(range(256)) * 9,
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b"{}",
}


def _refusal(data: bytes, limits: ArchiveLimits | None = None) -> ModelArchiveError:
    with pytest.raises(ModelArchiveError) as info:
        read_archive([data], limits)
    return info.value


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int) -> bytes:
    """An archive written by Python's tarfile (what another tar tool would send)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _canonical_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o644, 0, "", ""
    return info


def _with(header: bytes, **fields: tuple[int, bytes]) -> bytes:
    """`header` with byte ranges replaced and the checksum recomputed."""
    block = bytearray(header)
    for start, value in fields.values():
        block[start : start + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def _archive_after(extra: bytes) -> bytes:
    """A valid archive's files, then `extra` where the next header would go."""
    body = write_archive(FILES)[: -2 * BLOCK_SIZE]
    return body + extra


# -- the format ---------------------------------------------------------------------------


def test_round_trip_entries_offsets_and_config() -> None:
    data = write_archive(FILES)
    archive = read_archive([data])
    assert archive.names == tuple(sorted(FILES))
    assert archive.size == len(data) == archive_size(len(v) for v in FILES.values())
    assert archive.genai_config == CONFIG
    assert archive.data_bytes == sum(len(v) for v in FILES.values())
    for entry in archive.entries:
        assert data[entry.offset : entry.offset + entry.size] == FILES[entry.name]
    assert archive.entry("model.onnx") == ArchiveEntry(
        "model.onnx",
        len(FILES["model.onnx"]),
        archive.entry("model.onnx").offset,  # type: ignore[union-attr]
    )
    assert archive.entry("absent.onnx") is None


def test_same_bytes_as_tarfile_ustar_and_tarfile_reads_ours() -> None:
    """Canonical means: byte for byte what tarfile writes for such members (tarfile then
    pads to a 10240-byte record, which the parser accepts as zero padding)."""
    ours = write_archive(FILES)
    theirs = _tar(
        [(_canonical_info(n, len(FILES[n])), FILES[n]) for n in sorted(FILES)], tarfile.USTAR_FORMAT
    )
    assert len(theirs) % RECORD_SIZE == 0
    assert theirs[: len(ours)] == ours
    assert not any(theirs[len(ours) :])
    assert read_archive([theirs]).names == read_archive([ours]).names
    with tarfile.open(fileobj=io.BytesIO(ours)) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == FILES  # type: ignore[union-attr]


def test_events_stream_the_data_in_order() -> None:
    parser = ArchiveParser()
    data = write_archive(FILES)
    events = [e for i in range(0, len(data), 100) for e in parser.feed(data[i : i + 100])]
    parser.finish()
    got: dict[str, bytearray] = {}
    for event in events:
        if isinstance(event, ArchiveEntry):
            got[event.name] = bytearray()
        else:
            assert isinstance(event, EntryChunk)
            assert event.position == len(got[event.name])
            got[event.name] += event.data
    assert {k: bytes(v) for k, v in got.items()} == FILES


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=8000), max_size=12))
def test_chunk_boundaries_do_not_matter(cuts: list[int]) -> None:
    data = write_archive(FILES)
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert read_archive(pieces) == read_archive([data])


# -- fuzzing -------------------------------------------------------------------------------


def _outcome(pieces: list[bytes]) -> tuple[str, object]:
    try:
        archive = read_archive(pieces, ArchiveLimits(max_total_bytes=1 << 20))
    except ModelArchiveError as exc:
        return "refused", exc.reason
    return "parsed", archive


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3 * BLOCK_SIZE))
def test_fuzz_any_bytes_give_a_typed_refusal(data: bytes) -> None:
    kind, _ = _outcome([data])  # any other exception fails the test
    assert kind == "refused" or isinstance(_, ModelArchive)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=7167), st.integers(1, 255)), max_size=4
    ),
    cut=st.integers(min_value=0, max_value=8000),
    split=st.integers(min_value=1, max_value=900),
)
def test_fuzz_mutated_archives_same_answer_for_any_chunking(
    flips: list[tuple[int, int]], cut: int, split: int
) -> None:
    data = bytearray(write_archive(FILES))
    for position, xor in flips:
        if position < len(data):
            data[position] ^= xor
    mutated = bytes(data[:cut]) if cut < len(data) else bytes(data)
    whole = _outcome([mutated])
    chunked = _outcome([mutated[i : i + split] for i in range(0, len(mutated), split)])
    assert whole == chunked


def test_a_failed_parser_stays_failed() -> None:
    parser = ArchiveParser()
    with pytest.raises(ModelArchiveError) as first:
        parser.feed(b"\x01" * BLOCK_SIZE)
    with pytest.raises(ModelArchiveError) as again:
        parser.feed(write_archive(FILES))
    assert again.value is first.value
    with pytest.raises(ModelArchiveError):
        parser.finish()


# -- attacks: entry types ------------------------------------------------------------------


def _typed(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = _canonical_info(name, 0)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        (_typed("tokenizer.json", tarfile.SYMTYPE, "/etc/shadow"), "link"),
        (_typed("tokenizer.json", tarfile.LNKTYPE, "model.onnx"), "link"),
        (_typed("model.onnx", tarfile.CHRTYPE), "device"),
        (_typed("model.onnx", tarfile.BLKTYPE), "device"),
        (_typed("model.onnx", tarfile.FIFOTYPE), "fifo"),
        (_typed("weights.data", tarfile.DIRTYPE), "directory"),
        (_typed("model.onnx", tarfile.CONTTYPE), "type"),
    ],
)
def test_non_regular_entries_are_refused(info: tarfile.TarInfo, reason: str) -> None:
    exc = _refusal(_tar([(info, None)], tarfile.USTAR_FORMAT))
    assert exc.reason == reason
    assert exc.entry is not None
    assert exc.entry.rstrip("/") == info.name  # tarfile writes directories as 'name/'
    assert info.name in exc.message


def test_pax_header_is_refused() -> None:
    """A pax header would rename the next entry (here to an absolute path)."""
    info = _canonical_info("/etc/cron.d/x", 3)
    info.pax_headers = {"path": "/etc/cron.d/x"}
    exc = _refusal(_tar([(info, b"pwn")], tarfile.PAX_FORMAT))
    assert exc.reason == "pax"


def test_gnu_long_name_is_refused() -> None:
    long_name = "a" * 150 + ".onnx"
    gnu = _tar([(_canonical_info(long_name, 1), b"x")], tarfile.GNU_FORMAT)
    assert _refusal(gnu).reason == "not_ustar"  # GNU magic
    # the same 'L' header behind a ustar magic
    header = _with(gnu[:BLOCK_SIZE], magic=(257, b"ustar\x0000"))
    assert _refusal(header + gnu[BLOCK_SIZE:]).reason == "gnu"


def test_gnu_sparse_and_unknown_typeflags_are_refused() -> None:
    base = encode_header("model.onnx", 0)
    assert _refusal(_with(base, flag=(156, b"S")) + bytes(1024)).reason == "sparse"
    assert _refusal(_with(base, flag=(156, b"Z")) + bytes(1024)).reason == "type"
    assert _refusal(_with(base, flag=(156, b"\x00")) + bytes(1024)).reason == "type"


def test_link_name_on_a_regular_file_is_refused() -> None:
    header = _with(encode_header("model.onnx", 0), link=(157, b"/etc/passwd"))
    assert _refusal(header + bytes(1024)).reason == "link"


# -- attacks: names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/etc/passwd.onnx", "absolute_path"),
        ("\\server\\share.onnx", "absolute_path"),
        ("C:model.onnx", "absolute_path"),
        ("../model.onnx", "parent_path"),
        ("..", "parent_path"),
        ("weights/../../x.onnx", "parent_path"),
        ("sub/model.onnx", "not_flat"),
        ("sub\\model.onnx", "not_flat"),
        ("model..onnx", "bad_name"),
        (".hidden.onnx", "bad_name"),
        ("model onnx.onnx", "bad_name"),
        ("mod\x01el.onnx", "bad_name"),
        ("modèle.onnx", "bad_name"),
        ("", "bad_name"),
        ("x" * 101 + ".onnx", "bad_name"),
        ("run.sh", "unexpected_file"),
        ("model.py", "unexpected_file"),
        ("libcustom_ops.so", "unexpected_file"),
        ("config.json", "unexpected_file"),
    ],
)
def test_names_are_checked(name: str, reason: str) -> None:
    with pytest.raises(ModelArchiveError) as info:
        check_entry_name(name)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "name", ["/etc/passwd.onnx", "../model.onnx", "sub/model.onnx", "run.sh", "x\x7f.onnx"]
)
def test_hostile_names_in_real_headers_are_refused(name: str) -> None:
    info = _canonical_info(name, 1)
    exc = _refusal(_tar([(info, b"x")], tarfile.USTAR_FORMAT))
    assert exc.reason in {"absolute_path", "parent_path", "not_flat", "unexpected_file", "bad_name"}


def test_prefix_field_is_refused() -> None:
    """ustar's prefix joins as 'prefix/name': a flat name with a prefix is a path."""
    header = _with(encode_header("model.onnx", 0), prefix=(345, b"/etc"))
    exc = _refusal(header + bytes(1024))
    assert exc.reason == "not_flat"
    assert "'model.onnx'" in exc.message


def test_bytes_hidden_after_the_name_are_refused() -> None:
    header = _with(encode_header("model.onnx", 0), tail=(11, b"/../../x"))
    assert _refusal(header + bytes(1024)).reason == "bad_header"


def test_names_must_be_canonical_order_and_unique() -> None:
    body = write_archive(FILES)[: -2 * BLOCK_SIZE]
    again = encode_header("tokenizer_config.json", 2) + b"{}" + bytes(510)
    exc = _refusal(body + again + bytes(1024))
    assert (exc.reason, exc.entry) == ("duplicate", "tokenizer_config.json")
    earlier = encode_header("a.onnx", 0)
    exc = _refusal(body + earlier + bytes(1024))
    assert (exc.reason, exc.entry) == ("not_canonical", "a.onnx")


# -- attacks: sizes, refused before the data ---------------------------------------------


def test_entry_size_above_the_limit_is_refused_from_the_header_alone() -> None:
    parser = ArchiveParser(ArchiveLimits(max_total_bytes=1 << 30, max_entry_bytes=1 << 20))
    parser.feed(write_archive(FILES)[: -2 * BLOCK_SIZE])
    with pytest.raises(ModelArchiveError) as info:
        parser.feed(encode_header("zz.onnx.data", (1 << 20) + 1))  # no data byte sent
    assert (info.value.reason, info.value.entry) == ("too_large", "zz.onnx.data")
    assert str((1 << 20) + 1) in info.value.message


def test_total_above_the_limit_is_refused_from_the_header() -> None:
    limits = ArchiveLimits(max_total_bytes=10_000)
    parser = ArchiveParser(limits)
    parser.feed(encode_header("a.data", 6000) + bytes(6000) + bytes(-6000 % BLOCK_SIZE))
    with pytest.raises(ModelArchiveError) as info:
        parser.feed(encode_header("b.data", 6000))
    assert (info.value.reason, info.value.entry) == ("total_too_large", "b.data")


def test_metadata_and_config_have_their_own_bounds() -> None:
    limits = ArchiveLimits(max_metadata_bytes=1000)
    exc = _refusal(encode_header("tokenizer.json", 1001), limits)
    assert exc.reason == "too_large"
    exc = _refusal(encode_header("genai_config.json", MAX_CONFIG_BYTES + 1))
    assert (exc.reason, exc.entry) == ("too_large", "genai_config.json")


def test_huge_declared_size_does_not_allocate() -> None:
    """8 GiB declared by the largest octal size field: refused at once."""
    header = _with(encode_header("model.onnx", 0), size=(124, b"77777777777\x00"))
    assert _refusal(header).reason == "too_large"


def test_base256_and_malformed_numbers_are_refused() -> None:
    base = encode_header("model.onnx", 0)
    for field in (
        b"\x80" + bytes(10) + b"\x01",
        b"0000000001 1",
        b" 0000000001\x00",
        b"9" * 11 + b"\x00",
        b"000000000012",
    ):
        assert _refusal(_with(base, size=(124, field)) + bytes(1024)).reason == "bad_header"


def test_too_many_entries() -> None:
    files = dict(FILES) | {f"w{i:02}.data": b"" for i in range(10)}
    exc = _refusal(write_archive(files), ArchiveLimits(max_entries=12))
    assert exc.reason == "too_many_entries"


# -- attacks: structure --------------------------------------------------------------------


def test_bad_checksum() -> None:
    data = bytearray(write_archive(FILES))
    data[3] ^= 1  # the first name, checksum unchanged
    exc = _refusal(bytes(data))
    assert exc.reason == "bad_checksum"
    assert "byte 0" in exc.message


def test_not_ustar_magic() -> None:
    header = _with(encode_header("model.onnx", 0), magic=(257, b"ustar  \x00"))
    assert _refusal(header).reason == "not_ustar"
    v7 = _with(encode_header("model.onnx", 0), magic=(257, bytes(8)))
    assert _refusal(v7).reason == "not_ustar"


@pytest.mark.parametrize(
    ("start", "value"),
    [
        (100, b"0000755\x00"),
        (108, b"0001750\x00"),
        (116, b"0000001\x00"),
        (136, b"14712345670\x00"),
    ],
)
def test_non_canonical_metadata_is_refused(start: int, value: bytes) -> None:
    header = _with(encode_header("model.onnx", 0), f=(start, value))
    assert _refusal(header + bytes(1024)).reason == "not_canonical"


def test_owner_names_and_device_numbers_must_be_empty() -> None:
    for start, value in ((265, b"root"), (297, b"root"), (329, b"0000001\x00")):
        header = _with(encode_header("model.onnx", 0), f=(start, value))
        assert _refusal(header + bytes(1024)).reason == "not_canonical"


def test_truncated_archives_are_refused_at_every_length() -> None:
    data = write_archive(FILES)
    for cut in sorted(
        {0, 1, 511, 512, 600, 1024, 2000, len(data) - 1025, len(data) - 512, len(data) - 1}
    ):
        exc = _refusal(data[:cut])
        assert exc.reason in {"truncated", "missing_file"}, cut
    assert _refusal(data[:-1]).reason == "truncated"
    assert _refusal(data[:-BLOCK_SIZE]).reason == "truncated"  # one zero block only


def test_truncated_inside_an_entry_names_it() -> None:
    data = write_archive(FILES)
    entry = read_archive([data]).entry("model.onnx")
    assert entry is not None
    exc = _refusal(data[: entry.offset + 10])
    assert (exc.reason, exc.entry) == ("truncated", "model.onnx")


def test_trailing_garbage_is_refused() -> None:
    data = write_archive(FILES)
    assert _refusal(data + b"\x00" * 100 + b"x").reason == "trailing_data"
    assert _refusal(data + bytes(RECORD_SIZE + 1)).reason == "trailing_data"
    read_archive([data + bytes(RECORD_SIZE)])  # tar's record padding is fine


def test_a_header_after_a_single_zero_block_is_refused() -> None:
    """Readers that skip zero blocks would see a hidden entry here."""
    hidden = encode_header("zz.onnx", 1) + b"x" + bytes(511)
    exc = _refusal(_archive_after(bytes(BLOCK_SIZE) + hidden + bytes(1024)))
    assert exc.reason == "trailing_data"


def test_non_zero_padding_is_refused() -> None:
    data = bytearray(write_archive(FILES))
    entry = read_archive([bytes(data)]).entry("genai_config.json")
    assert entry is not None
    data[entry.offset + entry.size + 3] = 0x41
    exc = _refusal(bytes(data))
    assert (exc.reason, exc.entry) == ("bad_padding", "genai_config.json")


@pytest.mark.parametrize(
    "missing", ["genai_config.json", "tokenizer.json", "tokenizer_config.json"]
)
def test_required_files(missing: str) -> None:
    files = {k: v for k, v in FILES.items() if k != missing}
    exc = _refusal(write_archive(files))
    assert (exc.reason, exc.entry) == ("missing_file", missing)


def test_an_onnx_file_is_required() -> None:
    files = {k: v for k, v in FILES.items() if k != "model.onnx"}
    exc = _refusal(write_archive(files))
    assert (exc.reason, exc.entry) == ("missing_file", "*.onnx")


def test_an_archive_error_is_a_400_naming_the_entry() -> None:
    from blindinfer.server.errors import status_and_code

    exc = _refusal(
        _tar(
            [(_typed("tokenizer.json", tarfile.SYMTYPE, "/etc/shadow"), None)], tarfile.USTAR_FORMAT
        )
    )
    assert isinstance(exc, ProtocolError)
    status, code, message = status_and_code(exc)
    assert (status, code) == (400, "invalid_model_archive")
    assert "'tokenizer.json'" in message and "symbolic link" in message
    assert "/etc/shadow" not in message


# -- writing from a folder and extracting -------------------------------------------------


def _folder(tmp_path: Path, files: dict[str, bytes] = FILES) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_folder_archive_streams_the_canonical_bytes(tmp_path: Path) -> None:
    plan = FolderArchive.plan(_folder(tmp_path))
    pieces = list(plan.chunks(chunk_size=1000))
    assert b"".join(pieces) == write_archive(FILES)
    assert plan.size == len(b"".join(pieces))
    assert max(len(p) for p in pieces) <= 1024  # never a whole weight file at once
    assert b"".join(plan.chunks()) == write_archive(FILES)  # re-iterable for retries


def test_folder_archive_refuses_a_file_that_changed(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    plan = FolderArchive.plan(folder)
    (folder / "model.onnx").write_bytes(b"grown" * 1000)
    with pytest.raises(ModelArchiveError) as info:
        b"".join(plan.chunks())
    assert (info.value.reason, info.value.entry) == ("changed", "model.onnx")


def test_extract_writes_private_files_in_a_fresh_directory(tmp_path: Path) -> None:
    data = write_archive(FILES)
    out = tmp_path / "extracted"
    archive = extract_archive([data[i : i + 333] for i in range(0, len(data), 333)], out)
    assert archive.names == tuple(sorted(FILES))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == FILES
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}
    with pytest.raises(FileExistsError):
        extract_archive([data], out)


def test_extract_of_a_bad_archive_leaves_nothing(tmp_path: Path) -> None:
    data = write_archive(FILES)
    out = tmp_path / "extracted"
    with pytest.raises(ModelArchiveError):
        extract_archive([data[:-BLOCK_SIZE]], out)
    assert not out.exists()


def test_extract_does_not_follow_a_planted_link(tmp_path: Path) -> None:
    """Even if the destination were raced, O_EXCL|O_NOFOLLOW refuses existing names."""
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    out = tmp_path / "extracted"
    data = write_archive(FILES)

    def chunks() -> object:
        yield data[: BLOCK_SIZE - 1]
        os.symlink(target, out / "genai_config.json")
        yield data[BLOCK_SIZE - 1 :]

    with pytest.raises(FileExistsError):
        extract_archive(chunks(), out)  # type: ignore[arg-type]
    assert target.read_bytes() == b"keep"


# -- the client's folder check -------------------------------------------------------------


GOOD_CONFIG = (
    b'{"model": {"type": "llama", "context_length": 128, "vocab_size": 300, '
    b'"eos_token_id": 2, "decoder": {"filename": "model.onnx", "head_size": 16, '
    b'"num_hidden_layers": 2, "num_key_value_heads": 2}}}'
)


def test_model_folder_checks_and_streams(tmp_path: Path) -> None:
    files = dict(FILES) | {"genai_config.json": GOOD_CONFIG}
    folder = ModelFolder.open(_folder(tmp_path, files))
    assert folder.config.decoder.filename == "model.onnx"
    assert b"".join(folder.chunks()) == write_archive(files)
    assert folder.size == len(write_archive(files))


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda d: (d / "tokenizer.json").unlink(), "'tokenizer.json': is required"),
        (lambda d: (d / "extra").mkdir(), "'extra': is a directory"),
        (lambda d: (d / "x.onnx").symlink_to(d / "model.onnx"), "symbolic link"),
        (lambda d: (d / "notes.txt").write_text("x"), "'notes.txt': not a file"),
        (lambda d: (d / "genai_config.json").write_bytes(b"{"), "genai_config.json"),
        (
            lambda d: (d / "genai_config.json").write_bytes(
                GOOD_CONFIG.replace(b"model.onnx", b"other.onnx")
            ),
            "not a file of the model folder",
        ),
    ],
)
def test_model_folder_refusals_are_usage_errors(
    tmp_path: Path, setup: object, fragment: str
) -> None:
    folder = _folder(tmp_path, dict(FILES) | {"genai_config.json": GOOD_CONFIG})
    setup(folder)  # type: ignore[operator]
    with pytest.raises(UsageError) as info:
        ModelFolder.open(folder)
    assert fragment in str(info.value)


def test_model_folder_refuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(UsageError, match="not a directory"):
        ModelFolder.open(path)
