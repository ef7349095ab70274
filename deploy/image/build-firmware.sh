#!/usr/bin/env bash
# Builds the SEV-SNP firmware of the boot set (edk2 OvmfPkg/AmdSev/AmdSevX64, RELEASE) from
# Debian trixie's edk2 2025.02 source, pinned by SHA-256 in firmware.lock.
#
# Why from source: Debian's ovmf package has no AmdSev build, and only AmdSevX64 carries the
# SNP_KERNEL_HASHES section that lets the launch measurement cover kernel, initrd and
# command line (sev-snp-measure refuses --kernel without it).
# Why these choices make it reproducible:
#   - the sources are fixed by hash; the toolchain is Debian bookworm's (gcc, nasm, iasl),
#     whose versions the build records in firmware.toolchain;
#   - the build runs in one fixed directory (edk2 embeds build paths in the PE images);
#   - grub.efi (AmdSev's optional in-firmware bootloader for SEV secret injection) is an
#     empty file: direct kernel boot does not use it, and mkfs.msdos stamps volume ids and
#     times into it.
# Usage: build-firmware.sh OUT_DIR [CACHE_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build-firmware.sh OUT_DIR [CACHE_DIR]}"
cache="${2:-${XDG_CACHE_HOME:-$HOME/.cache}/blindinfer-image}"
work=/var/tmp/blindinfer-image-build/edk2
step() { echo "==> $*"; }

mkdir -p "$out" "$cache"
step "fetching edk2 sources pinned in firmware.lock"
while read -r sha name url; do
    case "$sha" in ''|'#'*) continue ;; esac
    if [ ! -f "$cache/$name" ] || ! echo "$sha  $cache/$name" | sha256sum -c --quiet - 2>/dev/null; then
        curl -sSfL --retry 3 -o "$cache/$name.part" "$url"
        mv "$cache/$name.part" "$cache/$name"
    fi
    echo "$sha  $cache/$name" | sha256sum -c --quiet - || {
        echo "error: $name does not match firmware.lock (sha256 $sha)" >&2; exit 1; }
done < "$here/firmware.lock"

step "installing the build tools from Debian (nasm, iasl, uuid-dev)"
if ! command -v nasm >/dev/null || ! command -v iasl >/dev/null || [ ! -f /usr/include/uuid/uuid.h ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nasm acpica-tools uuid-dev >/dev/null
fi

step "unpacking into $work (a fixed path: edk2 embeds it)"
rm -rf "$work"; mkdir -p "$work"
tar -xJf "$cache/edk2_2025.02.orig.tar.xz" -C "$work" --strip-components=1
tar -xJf "$cache/edk2_2025.02-8+deb13u1.debian.tar.xz" -C "$work"
cd "$work"
while read -r patch; do
    case "$patch" in ''|'#'*) continue ;; esac
    patch -s -p1 < "debian/patches/$patch"
done < debian/patches/series
: > OvmfPkg/AmdSev/Grub/grub.efi

step "building edk2 BaseTools"
export SOURCE_DATE_EPOCH=1735689600
make -C BaseTools -j"$(nproc)" > "$work.log" 2>&1 || { tail -20 "$work.log" >&2; exit 1; }
step "building OvmfPkg/AmdSev/AmdSevX64.dsc (RELEASE, GCC5)"
# edksetup.sh is written for interactive shells (no -e, no -u) and reads "$@" as its options
set --; set +eu; . ./edksetup.sh >/dev/null; set -eu
build -a X64 -t GCC5 -p OvmfPkg/AmdSev/AmdSevX64.dsc -b RELEASE -n "$(nproc)" >> "$work.log" 2>&1 ||
    { tail -20 "$work.log" >&2; exit 1; }
cp Build/AmdSev/RELEASE_GCC5/FV/OVMF.fd "$out/OVMF.amdsev.fd"
{
    echo "gcc $(gcc -dumpfullversion)"
    echo "nasm $(nasm -v | awk '{print $3}')"
    echo "iasl $(iasl -v | awk '/version/ {print $NF; exit}')"
} > "$out/firmware.toolchain"
step "firmware: $out/OVMF.amdsev.fd sha256 $(sha256sum "$out/OVMF.amdsev.fd" | cut -c1-64)"
