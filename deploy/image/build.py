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
import lzma
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from apt_mirror import NoMirrorError, debian_mirror

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EPOCH = 1735689600  # 2025-01-01: every file's mtime, and SOURCE_DATE_EPOCH of the firmware
# bookworm-backports' 6.12: the first Debian kernel for bookworm with configfs-tsm (Linux
# 6.7+), through which the server gets SNP and TDX evidence
KERNEL_VERSION = "6.12.95+deb12-cloud-amd64"
CMDLINE = "console=ttyS0 panic=-1"
# The modules /init loads (virtio and virtio_pci are built in): the network card, and
# configfs-tsm with the SNP and TDX guest drivers. Debian ships them xz-compressed; they go
# into the initrd decompressed, so busybox insmod loads them and no xz runs at boot.
MODULES = ("failover", "net_failover", "virtio_net", "configfs", "tsm", "sev-guest", "tdx-guest")
FIRMWARE = {"firmware": "OVMF.amdsev.fd", "firmware_tdx": "OVMF.inteltdx.fd"}
SITE = "usr/lib/blindinfer"  # PYTHONPATH of the image (deploy/image/init)
# Debian paths the image does not need: documentation, locales, the test suites, idle
DROP = (
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/lintian/",
    "usr/share/locale/",
    "usr/lib/python3.11/test/",
    "usr/lib/python3.11/idlelib/",
    "usr/lib/python3.11/ensurepip/",
    "usr/lib/python3.11/pydoc_data/",
    "usr/lib/python3.11/tkinter/",
    "boot/",
)


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

    def prune_empty(self, prefix: str) -> None:
        """Drops the directories under prefix that hold nothing (modules left out)."""
        while True:
            parents = {name.rsplit("/", 1)[0] for name in self.entries if "/" in name}
            empty = [
                name
                for name, (mode, _) in self.entries.items()
                if name.startswith(prefix) and stat.S_ISDIR(mode) and name not in parents
            ]
            if not empty:
                return
            for name in empty:
                del self.entries[name]

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
    data = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True
    ).stdout
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
                data = stream.read()
                if path.endswith(".ko.xz"):
                    path, data = path[:-3], lzma.decompress(data)
                tree.add(path, stat.S_IFREG | perm, data)


def fetch_debs(cache: Path, mirror: str) -> list[Path]:
    debs = []
    for line in (HERE / "packages.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        package, version, sha, path = line.split()
        deb = cache / path.rsplit("/", 1)[1]
        if not deb.is_file() or _sha256(deb) != sha:
            _download(mirror + path, deb)
        if _sha256(deb) != sha:
            deb.unlink()
            sys.exit(
                f"error: {package} {version} from {mirror}{path} does not match "
                f"packages.lock (sha256 {sha}); if the mirror dropped that version, put "
                f"the file from Debian's snapshot archive into {cache}"
            )
        debs.append(deb)
    return debs


def _download(url: str, target: Path) -> None:
    import urllib.error
    import urllib.request

    partial = target.with_suffix(".part")
    try:
        # the URL is the chosen mirror + a pool path from packages.lock
        with urllib.request.urlopen(url, timeout=120) as response, partial.open("wb") as out:  # noqa: S310
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        sys.exit(
            f"error: cannot download {url} ({exc}); check the network or put the "
            f"file into {target.parent}"
        )
    partial.replace(target)


def install_wheels(cache: Path, target: Path) -> None:
    wheels = cache / "wheels"
    common = [
        "--only-binary=:all:",
        "--no-deps",
        "--require-hashes",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--platform",
        "manylinux_2_28_x86_64",
        "--platform",
        "manylinux_2_27_x86_64",
        "--platform",
        "manylinux_2_17_x86_64",
        "--platform",
        "manylinux2014_x86_64",
        "--platform",
        "manylinux_2_5_x86_64",
        "--platform",
        "manylinux1_x86_64",
        "-r",
        str(HERE / "requirements.lock"),
    ]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "download", "-d", str(wheels), *common], check=True)
    subprocess.run(
        [
            *pip,
            "install",
            "--no-compile",
            "--no-index",
            "--find-links",
            str(wheels),
            "--target",
            str(target),
            *common,
        ],
        check=True,
    )


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
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "src/blindinfer"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if dirty:
        print(
            f"warning: src/blindinfer has uncommitted changes; the image holds commit "
            f"{commit[:12]} without them (commit first to build what you have)",
            flush=True,
        )
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "src/blindinfer"],
        check=True,
        capture_output=True,
    ).stdout
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
    parser.add_argument("--out", type=Path, help="directory for the boot set")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "blindinfer-image",
        help="downloads, checked against the lock files before use",
    )
    parser.add_argument(
        "--firmware",
        type=Path,
        metavar="DIR",
        help="take OVMF.amdsev.fd and OVMF.inteltdx.fd from DIR instead of "
        "building them (their hashes go into image.json; compare them with a "
        "build of your own)",
    )
    parser.add_argument(
        "--debian-mirror",
        metavar="URL",
        help="Debian archive root to download the pinned packages from (default: "
        "$BLINDINFER_DEBIAN_MIRROR, else the first Debian archive in this machine's apt "
        "sources); the lock's hashes decide, not the mirror",
    )
    parser.add_argument(
        "--print-debian-mirror", action="store_true", help="print the mirror that would be used"
    )
    args = parser.parse_args()
    try:
        mirror = debian_mirror(args.debian_mirror)
    except NoMirrorError as exc:
        sys.exit(f"error: {exc}")
    if args.print_debian_mirror:
        print(mirror)
        return 0
    if args.out is None:
        parser.error("--out is required")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache: Path = args.cache
    (cache / "debs").mkdir(parents=True, exist_ok=True)

    if args.firmware:
        for name in FIRMWARE.values():
            shutil.copyfile(args.firmware / name, out / name)
    else:
        subprocess.run(
            ["bash", str(HERE / "build-firmware.sh"), str(out), str(cache), mirror], check=True
        )

    step("fetching the Debian packages pinned in packages.lock")
    debs = fetch_debs(cache / "debs", mirror)
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
            tree.entries = {
                k: v
                for k, v in tree.entries.items()
                if not k.endswith(".ko") or k.rsplit("/", 1)[1][:-3] in MODULES
            }
            tree.prune_empty(f"usr/lib/modules/{KERNEL_VERSION}/")
            data = subprocess.run(
                ["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True
            ).stdout
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                stream = archive.extractfile(f"./boot/vmlinuz-{KERNEL_VERSION}")
                assert stream is not None
                (out / "vmlinuz").write_bytes(stream.read())
        else:
            unpack_deb(deb, tree)
    tree.add("init", stat.S_IFREG | 0o755, (HERE / "init").read_bytes())
    tree.add(
        "usr/share/udhcpc/default.script",
        stat.S_IFREG | 0o755,
        (HERE / "udhcpc.script").read_bytes(),
    )
    tree.add("etc/passwd", stat.S_IFREG | 0o644, b"root:x:0:0:root:/tmp:/bin/false\n")

    step("installing the Python wheels pinned in requirements.lock")
    with tempfile.TemporaryDirectory() as staging:
        install_wheels(cache, Path(staging))
        add_directory(tree, Path(staging), SITE)
    step("adding blindinfer from the committed source (git archive HEAD)")
    commit = blindinfer_source(tree)

    step("writing the initrd (newc cpio, uncompressed)")
    (out / "initrd.cpio").write_bytes(tree.cpio())
    files = (*FIRMWARE.values(), "vmlinuz", "initrd.cpio")
    manifest = {
        **FIRMWARE,
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
