"""What a client requires of the server's NVIDIA GPU: the `[gpu]` policy section.

A verified GPU report (`attestation.nvidia.verify.verify_nvidia_gpu`) proves which firmware,
VBIOS and driver an authentic H100 measured; this section says which of those are
acceptable. Because this client does not fetch NVIDIA's signed reference manifests
(RIMs) online, the user supplies reference values in a JSON file that they obtained and
checked themselves (for instance from NVIDIA's RIM service, or from a GPU they trust):

    {
      "measurements": {
        "1": ["<hex>", "<hex>"],
        "2": ["<hex>"],
        ...
      }
    }

Keys are measurement block indices (decimal strings, 1..254); each value is a non-empty
list of acceptable measurement values as hex (any case; a list allows rolling upgrades).
Every index listed must be present in the report with one of its values; indices not
listed are not checked. No other top-level key is allowed, and the file is at most
`MAX_REFERENCE_FILE_BYTES`. It is read once, when the policy is built, so a policy object
never changes under the caller's feet.

The section (TOML `[gpu]`, or a dict):

    reference_values = "h100-reference.json"   # required: a GPU policy must pin firmware
    min_driver_version = "550.90.07"           # optional: numeric, component by component
    allowed_vbios_versions = ["96.00.9f.00.01"]  # optional: NVIDIA's dotted spelling

A relative `reference_values` path is resolved against `base_dir` when given (the
directory of the policy file), else against the current directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from blindinfer.attestation.nvidia.verify import GpuVerified
from blindinfer.errors import Mismatch, PolicyError

MAX_REFERENCE_FILE_BYTES: Final = 1 << 20
"""A reference file for 64 measurement blocks with a few values each is about 20 KiB."""

MAX_MEASUREMENT_VALUE_BYTES: Final = 1024
"""H100 measurements are SHA-384 digests (48 bytes); far larger values are a mistake."""

_FIELDS: Final = frozenset({"reference_values", "min_driver_version", "allowed_vbios_versions"})
_DRIVER_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_VBIOS_VERSION = re.compile(r"[0-9a-fA-F]{2}(?:\.[0-9a-fA-F]{2}){4}")


def _version_key(version: str) -> tuple[int, ...]:
    """ "550.90.07" -> (550, 90, 7): versions compare numerically, not as text."""
    return tuple(int(part) for part in version.split("."))


@dataclass(frozen=True, slots=True)
class NvidiaGpuPolicy:
    """Acceptable GPU measurements (from the reference file) and versions."""

    reference_values: Mapping[int, tuple[bytes, ...]]
    reference_path: str = ""
    min_driver_version: str | None = None
    allowed_vbios_versions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.reference_values:
            raise PolicyError("gpu.reference_values must list at least one measurement")
        for index, values in self.reference_values.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= 254:
                raise PolicyError("gpu.reference_values: indices are 1..254")
            if not values or not all(isinstance(v, bytes) and v for v in values):
                raise PolicyError(f"gpu.reference_values: index {index} needs hex values")
        if self.min_driver_version is not None and not _DRIVER_VERSION.fullmatch(
            self.min_driver_version
        ):
            raise PolicyError('gpu.min_driver_version is dotted digits, e.g. "550.90.07"')
        for vbios in self.allowed_vbios_versions:
            if not _VBIOS_VERSION.fullmatch(vbios):
                raise PolicyError('gpu.allowed_vbios_versions values look like "96.00.9f.00.01"')

    @classmethod
    def from_dict(
        cls, table: Mapping[str, Any], *, base_dir: str | Path | None = None
    ) -> NvidiaGpuPolicy:
        """Build from the `[gpu]` table; reads the reference file now (PolicyError if bad)."""
        if not isinstance(table, Mapping):
            raise PolicyError("gpu must be a table")
        unknown = sorted(set(table) - _FIELDS)
        if unknown:
            raise PolicyError(
                f"unknown field(s) in gpu: {['gpu.' + str(k) for k in unknown]}; "
                f"known: {sorted(_FIELDS)}"
            )
        if "reference_values" not in table:
            raise PolicyError(
                "gpu.reference_values is required: a GPU policy must pin the firmware it accepts"
            )
        raw_path = table["reference_values"]
        if not isinstance(raw_path, str | Path) or not str(raw_path):
            raise PolicyError("gpu.reference_values is the path of a JSON file")
        path = Path(raw_path)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        min_driver = table.get("min_driver_version")
        if min_driver is not None and not isinstance(min_driver, str):
            raise PolicyError('gpu.min_driver_version is a string, e.g. "550.90.07"')
        vbios = table.get("allowed_vbios_versions", [])
        if isinstance(vbios, str):
            vbios = [vbios]
        if not isinstance(vbios, list | tuple) or not all(isinstance(v, str) for v in vbios):
            raise PolicyError("gpu.allowed_vbios_versions is a list of strings")
        return cls(
            reference_values=MappingProxyType(load_reference_values(path)),
            reference_path=str(path),
            min_driver_version=min_driver,
            allowed_vbios_versions=tuple(v.lower() for v in vbios),
        )

    def validate(self, verified: GpuVerified) -> list[Mismatch]:
        """Every failing requirement at once (empty list: the GPU is acceptable)."""
        found: list[Mismatch] = []
        for index in sorted(self.reference_values):
            accepted = self.reference_values[index]
            got = verified.measurements.get(index)
            if got is None or got not in accepted:
                found.append(
                    Mismatch(
                        f"gpu.measurement[{index}]",
                        " or ".join(v.hex() for v in accepted),
                        "absent" if got is None else got.hex(),
                    )
                )
        if self.min_driver_version is not None:
            driver = verified.driver_version
            if (
                driver is None
                or not _DRIVER_VERSION.fullmatch(driver)
                or _version_key(driver) < _version_key(self.min_driver_version)
            ):
                found.append(
                    Mismatch(
                        "gpu.driver_version",
                        f">= {self.min_driver_version}",
                        "absent" if driver is None else driver,
                    )
                )
        if self.allowed_vbios_versions:
            vbios = verified.vbios_version
            if vbios is None or vbios.lower() not in self.allowed_vbios_versions:
                found.append(
                    Mismatch(
                        "gpu.vbios_version",
                        " or ".join(self.allowed_vbios_versions),
                        "absent" if vbios is None else vbios,
                    )
                )
        return found


def load_reference_values(path: str | Path) -> dict[int, tuple[bytes, ...]]:
    """Read and check a reference file (format in the module docstring)."""
    where = f"gpu.reference_values ({path})"
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_REFERENCE_FILE_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"{where}: cannot read the file: {exc}") from exc
    if len(data) > MAX_REFERENCE_FILE_BYTES:
        raise PolicyError(f"{where}: the file exceeds {MAX_REFERENCE_FILE_BYTES} bytes")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PolicyError(f"{where}: not valid JSON: {exc}") from exc
    return parse_reference_values(document, where)


def parse_reference_values(
    document: object, where: str = "gpu.reference_values"
) -> dict[int, tuple[bytes, ...]]:
    """Check the decoded JSON: {"measurements": {"<index>": ["<hex>", ...]}}."""
    if not isinstance(document, dict) or set(document) != {"measurements"}:
        raise PolicyError(f'{where}: the file must be {{"measurements": {{...}}}} and nothing else')
    table = document["measurements"]
    if not isinstance(table, dict) or not table:
        raise PolicyError(f"{where}: measurements must be a non-empty object")
    out: dict[int, tuple[bytes, ...]] = {}
    for key, values in table.items():
        if not isinstance(key, str) or not key.isascii() or not key.isdigit():
            raise PolicyError(f"{where}: measurement index {key!r} is not a decimal number")
        index = int(key)
        if not 1 <= index <= 254 or index in out:
            raise PolicyError(f"{where}: measurement index {key!r} is not 1..254 or repeats")
        if not isinstance(values, list) or not values:
            raise PolicyError(f"{where}: measurements[{key}] must be a non-empty list of hex")
        decoded: list[bytes] = []
        for value in values:
            if not isinstance(value, str) or len(value) > 2 * MAX_MEASUREMENT_VALUE_BYTES:
                raise PolicyError(f"{where}: measurements[{key}] values are hex strings")
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raise PolicyError(
                    f"{where}: measurements[{key}]: {value[:80]!r} is not hex"
                ) from None
            if not raw:
                raise PolicyError(f"{where}: measurements[{key}] has an empty value")
            decoded.append(raw)
        out[index] = tuple(decoded)
    return out
