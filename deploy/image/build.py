#!/usr/bin/env python3
"""Builds blindinfer's confidential-VM boot set: firmware, kernel, initrd, command line.

Run by `blindinfer image build --out DIR` (or directly: `python3 deploy/image/build.py
--out DIR`). Every input is pinned: Debian packages by version and SHA-256
(packages.lock), Python wheels by SHA-256 (requirements.lock), blindinfer by the git commit
it is built from (`git archive HEAD`: uncommitted changes never enter an image). The initrd
is the whole root file system, an uncompressed newc cpio written here with sorted names,
fixed owners and one timestamp, so two builds of one commit are byte-identical and no
compressor's version can change it. No maintainer script runs and nothing is generated at
build time (no machine-id, no ldconfig cache, no .pyc).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EPOCH = 1735689600  # 2025-01-01: every file's mtime, and SOURCE_DATE_EPOCH of the firmware
KERNEL_VERSION = "6.1.0-50-cloud-amd64"
CMDLINE = "console=ttyS0 panic=-1"
MODULES = (
    "virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net",
)  # fmt: skip
SITE = "usr/lib/blindinfer"  # PYTHONPATH of the image (deploy/image/init)
# Debian paths the image does not need: documentation, locales, the test suites, idle
DROP = ("usr/share/doc/", "usr/share/man/", "usr/share/lintian/", "usr/share/locale/",
        "usr/lib/python3.11/test/", "usr/lib/python3.11/idlelib/", "usr/lib/python3.11/ensurepip/",
        "usr/lib/python3.11/pydoc_data/", "usr/lib/python3.11/tkinter/", "boot/")  # fmt: skip


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


class Tree:
    """The initrd's files by path: (mode, bytes) for files, symlinks and directories."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes]] = {}

    def add(self, path: str, mode: int, data: bytes = b"") -> None:
        path = path.strip("/")
        if not path or any(path.startswith(prefix) for prefix in DROP):
            return
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in self.entries:
                self.entries[parent] = (stat.S_IFDIR | 0o755, b"")
        self.entries[path] = (mode, data)

    def cpio(self) -> bytes:
        out = io.BytesIO()
        for inode, name in enumerate(sorted(self.entries), start=1):
            mode, data = self.entries[name]
            _newc(out, name, mode, data, inode)
        _newc(out, "TRAILER!!!", 0, b"", 0)
        out.write(b"\0" * (-out.tell() % 512))
        return out.getvalue()


def _newc(out: io.BytesIO, name: str, mode: int, data: bytes, inode: int) -> None:
    raw = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (inode, mode, 0, 0, nlink, EPOCH, len(data), 0, 0, 0, 0, len(raw), 0)
    out.write(b"070701" + b"".join(b"%08X" % value for value in fields))
    out.write(raw + b"\0" * (-(110 + len(raw)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def merged_usr(name: str) -> str:
    """Debian bookworm packages still ship /lib, /bin, /sbin; the image is merged-/usr."""
    name = name.removeprefix("./").rstrip("/")
    for top in ("bin", "sbin", "lib", "lib64"):
        if name == top or name.startswith(top + "/"):
            return "usr/" + name
    return name




def unpack_deb(deb: Path, tree: Tree, keep: tuple[str, ...] | None = None) -> None:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                          capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive:
            path = merged_usr(member.name)
            if keep is not None and not any(path.startswith(k) or path in k for k in keep):
                continue
            perm = member.mode & 0o7777
            if member.isdir():
                tree.add(path, stat.S_IFDIR | perm)
            elif member.issym():
                tree.add(path, stat.S_IFLNK | 0o777, member.linkname.encode())
            elif member.islnk():
                target = tree.entries.get(merged_usr(member.linkname))
                if target is not None:
                    tree.add(path, target[0], target[1])
            elif member.isfile():
                stream = archive.extractfile(member)
                assert stream is not None
                tree.add(path, stat.S_IFREG | perm, stream.read())


def fetch_debs(cache: Path) -> list[Path]:
    debs = []
    for line in (HERE / "packages.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        package, version, sha = line.split()
        found = [p for p in cache.glob(f"{package}_*.deb") if _sha256(p) == sha]
        if not found:
            subprocess.run(["apt-get", "download", "-q", f"{package}={version}"], cwd=cache,
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            found = [p for p in cache.glob(f"{package}_*.deb") if _sha256(p) == sha]
        if not found:
            sys.exit(f"error: {package} {version} does not match packages.lock (sha256 {sha}); "
                     "if the mirror dropped that version, fetch it from snapshot.debian.org")  # fmt: skip
        debs.append(found[0])
    return debs


def install_wheels(cache: Path, target: Path) -> None:
    wheels = cache / "wheels"
    common = ["--only-binary=:all:", "--no-deps", "--require-hashes", "--python-version", "3.11",
              "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
              "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform",
              "manylinux2014_x86_64", "--platform", "manylinux_2_5_x86_64", "--platform",
              "manylinux1_x86_64", "-r", str(HERE / "requirements.lock")]  # fmt: skip
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "download", "-d", str(wheels), *common], check=True)
    subprocess.run([*pip, "install", "--no-compile", "--no-index", "--find-links", str(wheels),
                    "--target", str(target), *common], check=True)  # fmt: skip


def add_directory(tree: Tree, source: Path, prefix: str) -> None:
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source).as_posix()
        if "__pycache__" in relative or relative.startswith("bin/"):
            continue  # pip's console scripts name the build host's interpreter
        name = f"{prefix}/{relative}"
        if path.is_symlink():
            tree.add(name, stat.S_IFLNK | 0o777, str(path.readlink()).encode())
        elif path.is_dir():
            tree.add(name, stat.S_IFDIR | 0o755)
        else:
            executable = path.stat().st_mode & 0o111
            tree.add(name, stat.S_IFREG | (0o755 if executable else 0o644), path.read_bytes())


def blindinfer_source(tree: Tree) -> str:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit,
                              "src/blindinfer"], check=True, capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar:
            name = f"{SITE}/{member.name.removeprefix('src/')}"
            if member.isdir():
                tree.add(name, stat.S_IFDIR | 0o755)
            elif member.isfile():
                stream = tar.extractfile(member)
                assert stream is not None
                tree.add(name, stat.S_IFREG | 0o644, stream.read())
    return commit


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the boot set")
    parser.add_argument("--cache", type=Path,
                        default=Path.home() / ".cache" / "blindinfer-image",
                        help="downloads, checked against the lock files before use")  # fmt: skip
    parser.add_argument("--firmware", type=Path,
                        help="use this OVMF.amdsev.fd instead of building it (its hash goes "
                        "into image.json; compare it with a build of your own)")  # fmt: skip
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache: Path = args.cache
    (cache / "debs").mkdir(parents=True, exist_ok=True)

    if args.firmware:
        shutil.copyfile(args.firmware, out / "OVMF.amdsev.fd")
    else:
        subprocess.run(["bash", str(HERE / "build-firmware.sh"), str(out), str(cache)], check=True)

    step("fetching the Debian packages pinned in packages.lock")
    debs = fetch_debs(cache / "debs")
    tree = Tree()
    for name in ("bin", "sbin", "lib", "lib64"):
        tree.add(name, stat.S_IFLNK | 0o777, f"usr/{name}".encode())
    for name in ("proc", "sys", "dev", "tmp", "run", "etc"):
        tree.add(name, stat.S_IFDIR | 0o755)
    step("unpacking them into the initrd tree")
    for deb in debs:
        if deb.name.startswith("linux-image-"):
            modules = tuple(f"usr/lib/modules/{KERNEL_VERSION}/kernel/" for _ in (0,))
            unpack_deb(deb, tree, keep=modules)
            tree.entries = {k: v for k, v in tree.entries.items()
                            if not k.endswith(".ko") or k.rsplit("/", 1)[1][:-3] in MODULES}  # fmt: skip
            data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                                  capture_output=True).stdout  # fmt: skip
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                stream = archive.extractfile(f"./boot/vmlinuz-{KERNEL_VERSION}")
                assert stream is not None
                (out / "vmlinuz").write_bytes(stream.read())
        else:
            unpack_deb(deb, tree)
    tree.add("init", stat.S_IFREG | 0o755, (HERE / "init").read_bytes())
    tree.add("usr/share/udhcpc/default.script", stat.S_IFREG | 0o755,
             (HERE / "udhcpc.script").read_bytes())  # fmt: skip
    tree.add("etc/passwd", stat.S_IFREG | 0o644, b"root:x:0:0:root:/tmp:/bin/false\n")

    step("installing the Python wheels pinned in requirements.lock")
    with tempfile.TemporaryDirectory() as staging:
        install_wheels(cache, Path(staging))
        add_directory(tree, Path(staging), SITE)
    step("adding blindinfer from the committed source (git archive HEAD)")
    commit = blindinfer_source(tree)

    step("writing the initrd (newc cpio, uncompressed)")
    (out / "initrd.cpio").write_bytes(tree.cpio())
    files = ("OVMF.amdsev.fd", "vmlinuz", "initrd.cpio")
    manifest = {
        "firmware": "OVMF.amdsev.fd",
        "kernel": "vmlinuz",
        "initrd": "initrd.cpio",
        "cmdline": CMDLINE,
        "sha256": {name: _sha256(out / name) for name in files},
        "source": {"commit": commit, "kernel": KERNEL_VERSION},
    }
    (out / "image.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for name in files:
        print(f"    {manifest['sha256'][name]}  {name}")  # type: ignore[index]
    step(f"boot set written to {out}/image.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
