#!/usr/bin/env bash
# Builds the firmware of the boot set from Debian trixie's edk2 2025.02 source, pinned by
# SHA-256 in firmware.lock: OvmfPkg/AmdSev/AmdSevX64 (SEV-SNP) and OvmfPkg/IntelTdx/IntelTdxX64
# (the TDVF, for TDX), both RELEASE.
#
# Why from source: Debian's ovmf package has neither build. Only AmdSevX64 carries the
# SNP_KERNEL_HASHES section that lets the launch measurement cover kernel, initrd and
# command line (sev-snp-measure refuses --kernel without it), and only IntelTdxX64 is the
# TDVF that measures the kernel, initrd and command line into RTMRs without the legacy
# devices and the non-TDX boot paths of OvmfPkgX64.
# Why these choices make it reproducible:
#   - the sources are fixed by hash; the toolchain is Debian bookworm's (gcc, nasm, iasl),
#     whose versions the build records in firmware.toolchain;
#   - the build runs in one fixed directory (edk2 embeds build paths in the PE images);
#   - grub.efi (AmdSev's optional in-firmware bootloader for SEV secret injection) is an
#     empty file: direct kernel boot does not use it, and mkfs.msdos stamps volume ids and
#     times into it.
# Usage: build-firmware.sh OUT_DIR [CACHE_DIR [DEBIAN_MIRROR]]
#   DEBIAN_MIRROR: the archive root holding pool/; by default build.py picks it (from
#   $BLINDINFER_DEBIAN_MIRROR or this machine's apt sources). No host is written here.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build-firmware.sh OUT_DIR [CACHE_DIR [DEBIAN_MIRROR]]}"
cache="${2:-${XDG_CACHE_HOME:-$HOME/.cache}/blindinfer-image}"
mirror="${3:-$(python3 "$here/build.py" --print-debian-mirror)}"
work=/var/tmp/blindinfer-image-build/edk2
step() { echo "==> $*"; }

mkdir -p "$out" "$cache"
step "fetching edk2 sources pinned in firmware.lock"
while read -r sha name path; do
    case "$sha" in ''|'#'*) continue ;; esac
    if [ ! -f "$cache/$name" ] || ! echo "$sha  $cache/$name" | sha256sum -c --quiet - 2>/dev/null; then
        curl -sSfL --retry 3 -o "$cache/$name.part" "${mirror%/}/$path"
        mv "$cache/$name.part" "$cache/$name"
    fi
    echo "$sha  $cache/$name" | sha256sum -c --quiet - || {
        echo "error: $name does not match firmware.lock (sha256 $sha)" >&2; exit 1; }
done < "$here/firmware.lock"

step "installing the build tools from Debian (nasm, iasl, uuid-dev)"
if ! command -v nasm >/dev/null || ! command -v iasl >/dev/null || [ ! -f /usr/include/uuid/uuid.h ]; then
    # a fresh machine may have no package lists yet
    ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -q >/dev/null
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
# edksetup.sh is written for interactive shells (no -e, no -u) and reads "$@" as its options
set --; set +eu; . ./edksetup.sh >/dev/null; set -eu
for platform in AmdSev/AmdSevX64:AmdSev:amdsev IntelTdx/IntelTdxX64:IntelTdx:inteltdx; do
    IFS=: read -r dsc build_dir name <<< "$platform"
    step "building OvmfPkg/$dsc.dsc (RELEASE, GCC5)"
    build -a X64 -t GCC5 -p "OvmfPkg/$dsc.dsc" -b RELEASE -n "$(nproc)" >> "$work.log" 2>&1 ||
        { tail -20 "$work.log" >&2; exit 1; }
    cp "Build/$build_dir/RELEASE_GCC5/FV/OVMF.fd" "$out/OVMF.$name.fd"
done
{
    echo "gcc $(gcc -dumpfullversion)"
    echo "nasm $(nasm -v | awk '{print $3}')"
    echo "iasl $(iasl -v | awk '/version/ {print $NF; exit}')"
} > "$out/firmware.toolchain"
for name in amdsev inteltdx; do
    step "firmware: $out/OVMF.$name.fd sha256 $(sha256sum "$out/OVMF.$name.fd" | cut -c1-64)"
done
