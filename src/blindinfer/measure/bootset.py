"""`image.json`: the boot set of a confidential VM, parsed once into typed paths.

The file comes from whoever built or published the image, so it is untrusted input: paths
must stay inside the image directory, the set of keys is closed, and every named file must
exist. Where the file records SHA-256 digests, the files must match them, so a measurement
is never computed from a file swapped after the build.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from blindinfer.errors import UsageError

MANIFEST_NAME: Final = "image.json"
MAX_MANIFEST_BYTES: Final = 64 * 1024
MAX_CMDLINE_BYTES: Final = (
    4096  # Linux's COMMAND_LINE_SIZE on x86_64 is 2048; SEV's hash covers up to the file
)
FILE_KEYS: Final = ("firmware", "kernel", "initrd")
OPTIONAL_FILE_KEYS: Final = ("firmware_tdx",)
OTHER_KEYS: Final = ("cmdline", "sha256", "source")


@dataclass(frozen=True, slots=True)
class BootSet:
    """The files QEMU direct boot is given: `-bios firmware -kernel -initrd -append`."""

    directory: Path
    firmware: Path
    kernel: Path
    initrd: Path
    cmdline: str
    firmware_tdx: Path | None = None


def load_bootset(directory: Path) -> BootSet:
    manifest = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise UsageError(f"image directory '{directory}' does not exist or is not a directory")
    if not manifest.is_file():
        raise UsageError(
            f"'{directory}' has no {MANIFEST_NAME}: give the directory that "
            "`blindinfer image build --out DIR` wrote"
        )
    raw = manifest.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise UsageError(f"{manifest} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{manifest} is not valid JSON ({exc})") from exc
    return parse_bootset(document, directory)


def parse_bootset(document: object, directory: Path) -> BootSet:
    where = f"{directory / MANIFEST_NAME}"
    if not isinstance(document, dict):
        raise UsageError(f"{where}: expected a JSON object")
    unknown = sorted(set(document) - set(FILE_KEYS) - set(OPTIONAL_FILE_KEYS) - set(OTHER_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = [key for key in (*FILE_KEYS, "cmdline") if key not in document]
    if missing:
        raise UsageError(f"{where}: missing key(s) {', '.join(missing)}")
    cmdline = document["cmdline"]
    if not isinstance(cmdline, str) or len(cmdline.encode()) > MAX_CMDLINE_BYTES:
        raise UsageError(f"{where}: cmdline must be a string of at most {MAX_CMDLINE_BYTES} bytes")
    if "\x00" in cmdline:
        raise UsageError(f"{where}: cmdline contains a NUL byte")
    digests = _digests(document.get("sha256", {}), where)
    files = {
        key: _file(document[key], key, directory, where)
        for key in (*FILE_KEYS, *OPTIONAL_FILE_KEYS)
        if key in document
    }
    for key, path in files.items():
        expected = digests.get(path.name)
        if expected is not None and _sha256(path) != expected:
            raise UsageError(
                f"{where}: {key} file {path.name} does not match the SHA-256 recorded in "
                f"{MANIFEST_NAME}; rebuild the image or fetch it again"
            )
    return BootSet(
        directory=directory,
        firmware=files["firmware"],
        kernel=files["kernel"],
        initrd=files["initrd"],
        cmdline=cmdline,
        firmware_tdx=files.get("firmware_tdx"),
    )


def _file(value: object, key: str, directory: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: {key} must be a file name relative to the image directory")
    relative = PurePosixPath(value)
    if relative.is_absolute() or ".." in relative.parts or "\\" in value:
        raise UsageError(f"{where}: {key} '{value}' must stay inside the image directory")
    path = directory.joinpath(*relative.parts)
    if not path.is_file():
        raise UsageError(f"{where}: {key} file '{value}' is missing from {directory}")
    return path


def _digests(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in value.items()
    ):
        raise UsageError(f"{where}: sha256 must map file names to 64-digit hex digests")
    return {name: digest.lower() for name, digest in value.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
