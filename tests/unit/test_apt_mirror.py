"""The image build's Debian mirror comes from the user or this machine's apt sources:
no host name is written into the repository (deploy/image/apt_mirror.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "deploy" / "image"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("apt_mirror", IMAGE / "apt_mirror.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


apt_mirror = _module()


def _apt(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_deb822_sources_skip_security_and_disabled(tmp_path: Path) -> None:
    apt = _apt(
        tmp_path,
        {
            "sources.list.d/a.sources": (
                "Types: deb\nURIs: http://mirror.example/debian-security\n"
                "Suites: bookworm-security\nComponents: main\n\n"
                "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
                "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n\n"
                "# comment\nTypes: deb\nURIs: http://mirror.example/debian\n"
                "Suites: bookworm bookworm-updates\nComponents: main\n"
            )
        },
    )
    assert list(apt_mirror.apt_archives(apt)) == ["http://mirror.example/debian"]
    assert apt_mirror.debian_mirror(None, apt) == "http://mirror.example/debian/"


def test_one_line_sources_with_options(tmp_path: Path) -> None:
    apt = _apt(
        tmp_path,
        {
            "sources.list": (
                "# deb http://commented.example/debian bookworm main\n"
                "deb-src http://src.example/debian bookworm main\n"
                "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n"
                "deb http://sec.example/debian-security bookworm-security main\n"
            )
        },
    )
    assert list(apt_mirror.apt_archives(apt)) == ["http://one.example/debian"]


def test_option_and_environment_come_before_apt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apt = _apt(tmp_path, {"sources.list": "deb http://apt.example/debian bookworm main\n"})
    monkeypatch.setenv("BLINDINFER_DEBIAN_MIRROR", "https://env.example/debian")
    assert apt_mirror.debian_mirror(None, apt) == "https://env.example/debian/"
    assert apt_mirror.debian_mirror("file:///srv/debian/", apt) == "file:///srv/debian/"


def test_no_mirror_anywhere_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BLINDINFER_DEBIAN_MIRROR", raising=False)
    with pytest.raises(apt_mirror.NoMirrorError, match="pass --debian-mirror URL"):
        apt_mirror.debian_mirror(None, _apt(tmp_path, {}))
    with pytest.raises(apt_mirror.NoMirrorError, match="expected an http"):
        apt_mirror.debian_mirror("mirror.example/debian", tmp_path)


def test_build_prints_the_mirror_it_would_use() -> None:
    result = subprocess.run(
        [sys.executable, str(IMAGE / "build.py"), "--print-debian-mirror"],
        capture_output=True,
        text=True,
        env={"BLINDINFER_DEBIAN_MIRROR": "http://chosen.example/debian", "PATH": "/usr/bin"},
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "http://chosen.example/debian/\n")


def test_the_lock_files_name_pool_paths_not_hosts() -> None:
    for lock, column in (("packages.lock", 3), ("firmware.lock", 2)):
        rows = [
            line.split()
            for line in (IMAGE / lock).read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert rows, lock
        assert [row[column] for row in rows if not row[column].startswith("pool/main/")] == []
        assert "://" not in (IMAGE / lock).read_text(), lock
