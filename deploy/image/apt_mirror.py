"""Which Debian mirror the image build downloads its pinned files from.

No mirror's host name is written into the repository: the lock files hold pool paths and
SHA-256 digests, and the mirror comes from the user (`--debian-mirror`, or the environment
variable BLINDINFER_DEBIAN_MIRROR) or else from this machine's own apt configuration. Any
mirror will do, since the lock's hashes decide what is accepted, not where it came from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

ENVIRONMENT = "BLINDINFER_DEBIAN_MIRROR"
APT_DIR = Path("/etc/apt")


class NoMirrorError(Exception):
    """No Debian archive is configured anywhere this build looks."""


def debian_mirror(option: str | None = None, apt_dir: Path = APT_DIR) -> str:
    """The archive root (the directory that holds `pool/`), ending in one slash."""
    chosen = option or os.environ.get(ENVIRONMENT) or next(apt_archives(apt_dir), None)
    if not chosen:
        raise NoMirrorError(
            f"no Debian archive in this machine's apt sources ({apt_dir}); pass "
            f"--debian-mirror URL or set {ENVIRONMENT} (the archive root that holds pool/)"
        )
    if not chosen.startswith(("http://", "https://", "file:/")):
        raise NoMirrorError(f"Debian mirror {chosen!r}: expected an http(s):// or file:/ URL")
    return chosen.rstrip("/") + "/"


def apt_archives(apt_dir: Path = APT_DIR) -> Iterator[str]:
    """The URIs of the binary `deb` sources configured here, main archive first.

    Security archives are left out: they hold only security updates, and their pools miss
    most of what the lock pins."""
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(parts.iterdir())
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if path.name.endswith(".sources"):
            entries = _deb822(text)
        elif path.name.endswith(".list"):
            entries = _one_line(text)
        else:
            continue
        for uri, suites in entries:
            if not any(s.endswith(("-security", "/updates")) for s in suites):
                yield uri


def _one_line(text: str) -> Iterator[tuple[str, list[str]]]:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "deb":
            continue
        if words[1].startswith("["):  # options: [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = ["deb", *words[1:]]
        if len(words) >= 3:
            yield words[1], words[2:3]


def _deb822(text: str) -> Iterator[tuple[str, list[str]]]:
    for stanza in _stanzas(text.splitlines()):
        if "deb" not in stanza.get("types", "").split():
            continue
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        suites = stanza.get("suites", "").split()
        for uri in stanza.get("uris", "").split():
            yield uri, suites


def _stanzas(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    key = ""
    for line in lines:
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, ""
        elif line[0] in " \t" and key:
            stanza[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            stanza[key] = value.strip()
    if stanza:
        yield stanza
