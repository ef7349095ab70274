"""The simulated MRENCLAVE: a reproducible digest of the server's code and configuration.

A real SGX MRENCLAVE covers every page loaded into the enclave. The simulation mirrors that
by hashing every Python source file of the installed blindinfer package (path and content,
in sorted order) together with the canonical JSON of the security-relevant settings, so
that changing any source file or any limit changes the value a policy pins.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import blindinfer

_DOMAIN = b"blindinfer-simulated-mrenclave-v1\x00"


def package_root() -> Path:
    return Path(blindinfer.__file__).resolve().parent


def measure(settings: Mapping[str, object], root: Path | None = None) -> bytes:
    """32-byte measurement of the package sources under `root` plus `settings`."""
    base = root or package_root()
    digest = hashlib.sha256(_DOMAIN)
    for path in sorted(base.rglob("*"), key=lambda p: p.relative_to(base).as_posix()):
        if "__pycache__" in path.parts or not path.is_file() or path.suffix in {".pyc", ".pyo"}:
            continue
        relative = path.relative_to(base).as_posix().encode()
        content = hashlib.sha256(path.read_bytes()).digest()
        digest.update(len(relative).to_bytes(4, "little") + relative + content)
    config = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    digest.update(b"\x00config\x00" + config)
    return digest.digest()
