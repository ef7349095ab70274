#!/usr/bin/env python3
"""Confidential Containers init-data for blindinfer's pods: encode it into the pod
annotation, decode an annotation, and print the launch value a client's policy pins.

    python3 deploy/kubernetes/initdata.py encode overlays/snp/initdata.toml
    python3 deploy/kubernetes/initdata.py decode "$ANNOTATION"        # the TOML, as hashed
    python3 deploy/kubernetes/initdata.py digest overlays/snp/initdata.toml --platform snp
    python3 deploy/kubernetes/initdata.py sync deploy/kubernetes/overlays/snp [--check]

Why it exists: the init-data document (the Kata agent policy that pins blindinfer's image
and arguments, and the attestation agent's and CDH's KBS settings) reaches the pod VM from
the untrusted host. Its integrity comes from the hardware: the host launches the VM with
the document's digest in SNP `HOST_DATA` or TDX `MRCONFIGID`, the guest refuses init-data
whose digest differs, and the report carries the digest. A client that pins that digest
(`[snp] host_data` / `[tdx] mrconfigid`) therefore pins the policy, and through it the
container image and every argument of `blindinfer serve`.

The format, as read (not copied) from the upstream sources:
- kata-containers `src/libs/kata-types/src/initdata.rs`: the annotation
  `io.katacontainers.config.hypervisor.cc_init_data` is standard base64 of the gzip of the
  TOML; `version = "0.1.0"`, `algorithm` one of sha256, sha384, sha512; the digest is the
  hash of the TOML text (not of the gzip), cut or zero-padded to the field: 32 bytes on
  SNP, 48 on TDX (`adjust_digest`).
- kata-containers `src/agent/src/initdata.rs`: the agent reads the `data` keys
  `aa.toml`, `cdh.toml` and `policy.rego`.
- confidential-containers/trustee `kbs/docs/initdata.md`: the binding to HOST_DATA and
  MRCONFIGID.

Only the standard library: the tool runs wherever the manifests are edited. gzip is
written with mtime 0, so one TOML gives one annotation.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import gzip
import hashlib
import io
import re
import sys
import tomllib
from pathlib import Path
from typing import Final

ANNOTATION: Final = "io.katacontainers.config.hypervisor.cc_init_data"
VERSION: Final = "0.1.0"
ALGORITHMS: Final = ("sha256", "sha384", "sha512")
FIELD_BYTES: Final = {"snp": 32, "tdx": 48}
"""SNP HOST_DATA and TDX MRCONFIGID sizes: the digest is cut or zero-padded to them."""
MAX_TOML_BYTES: Final = 1 << 20
"""An annotation is at most 256 KiB in Kubernetes; a decoded document past 1 MiB is an error."""
KEYS: Final = ("aa.toml", "cdh.toml", "policy.rego")


class InitDataError(ValueError):
    """The document or annotation is not init-data this tool accepts."""


def parse(text: str) -> dict[str, object]:
    """The document as TOML, checked as Kata checks it (version, algorithm, string data)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InitDataError(f"init-data is not TOML: {exc}") from None
    if document.get("version") != VERSION:
        raise InitDataError(f"init-data version must be {VERSION!r}")
    if document.get("algorithm") not in ALGORITHMS:
        raise InitDataError(f"init-data algorithm must be one of {', '.join(ALGORITHMS)}")
    data = document.get("data")
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise InitDataError("init-data needs a [data] table of strings")
    return document


def encode(text: str) -> str:
    """The annotation value for the TOML `text` (checked first)."""
    parse(text)
    return base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode("ascii")


def decode(annotation: str) -> str:
    """The TOML text an annotation carries: the bytes the guest hashes."""
    try:
        packed = base64.b64decode(annotation.strip(), validate=True)
    except binascii.Error as exc:
        raise InitDataError(f"annotation is not base64: {exc}") from None
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(packed)) as stream:
            raw = stream.read(MAX_TOML_BYTES + 1)  # bounded: no gzip bomb
    except (OSError, EOFError) as exc:
        raise InitDataError(f"annotation is not gzip: {exc}") from None
    if len(raw) > MAX_TOML_BYTES:
        raise InitDataError(f"decoded init-data is larger than {MAX_TOML_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InitDataError("decoded init-data is not UTF-8") from None
    parse(text)
    return text


def digest(text: str, platform: str) -> bytes:
    """What the host puts in HOST_DATA (snp) or MRCONFIGID (tdx) for this TOML text."""
    document = parse(text)
    value = hashlib.new(str(document["algorithm"]), text.encode()).digest()
    size = FIELD_BYTES[platform]
    return value[:size].ljust(size, b"\0")


PATCH_FILE: Final = "deployment-patch.yaml"
_ANNOTATION_LINE: Final = re.compile(
    r"^(?P<head>\s*" + re.escape(ANNOTATION) + r": )(?P<value>.*)$", re.MULTILINE
)


def sync(overlay: Path, *, check: bool = False) -> bool:
    """Write the annotation for `overlay`/initdata.toml into `overlay`/deployment-patch.yaml
    (its one annotation line). Returns whether the file was already up to date; with
    `check`, writes nothing."""
    value = encode((overlay / "initdata.toml").read_text(encoding="utf-8"))
    patch = overlay / PATCH_FILE
    text = patch.read_text(encoding="utf-8")
    lines = list(_ANNOTATION_LINE.finditer(text))
    if len(lines) != 1:
        raise InitDataError(f"{patch}: expected one {ANNOTATION} line, found {len(lines)}")
    current = lines[0]["value"].strip().strip('"')
    if current == value:
        return True
    if not check:
        start, end = lines[0].span("value")
        patch.write_text(text[:start] + f'"{value}"' + text[end:], encoding="utf-8")
    return False


def _text_of(source: str) -> str:
    """A TOML file's text, or the TOML inside an annotation value given on the command line."""
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return decode(source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="initdata.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    enc = commands.add_parser("encode", help="print the annotation value for a TOML file")
    enc.add_argument("toml", type=Path)
    dec = commands.add_parser("decode", help="print the TOML an annotation value carries")
    dec.add_argument("annotation")
    dig = commands.add_parser(
        "digest", help="print the policy line that pins this init-data (host_data/mrconfigid)"
    )
    dig.add_argument("source", help="a TOML file, or an annotation value")
    dig.add_argument("--platform", choices=sorted(FIELD_BYTES), required=True)
    syn = commands.add_parser(
        "sync", help=f"write the annotation of OVERLAY/initdata.toml into OVERLAY/{PATCH_FILE}"
    )
    syn.add_argument("overlay", type=Path)
    syn.add_argument("--check", action="store_true", help="only say whether it is up to date")
    args = parser.parse_args(argv)
    try:
        if args.command == "encode":
            print(encode(args.toml.read_text(encoding="utf-8")))
        elif args.command == "sync":
            fresh = sync(args.overlay, check=args.check)
            if args.check and not fresh:
                print(f"{args.overlay / PATCH_FILE}: init-data annotation is out of date")
                return 1
        elif args.command == "decode":
            sys.stdout.write(decode(args.annotation))
        else:
            value = digest(_text_of(args.source), args.platform).hex()
            field = "host_data" if args.platform == "snp" else "mrconfigid"
            print(f'{field} = ["{value}"]')
    except (InitDataError, OSError) as exc:
        print(f"initdata.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
