"""What a client requires of the server's TEE, as data: the composition of the sections.

Each evidence kind's section lives with its kind ([sgx] in `intel.sgx_policy`, [tdx] in
`intel.tdx_policy`, [snp] in `snp.policy`, [gpu] in `nvidia.policy`); this module reads a
whole policy and holds the rules that span sections.

A policy is loaded from TOML (or built in Python) into frozen objects whose sizes are
checked at load time. Within a section, an unset field is not checked, a list field
accepts any of its values (for rolling upgrades). Secure defaults: only the UpToDate TCB
status, no advisories, never a debug enclave or guest. Every section must pin the code
identity (SGX: MRENCLAVE, or MRSIGNER with ISVPRODID; TDX: MRTD; SNP: the launch
measurement): without it any enclave or guest on a genuine platform would pass.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blindinfer.attestation.intel.blindai_manifest import (
    BLINDAI_MANIFEST_KEYS,
    load_blindai_manifest,
)
from blindinfer.attestation.intel.sgx_policy import TCB_STATUSES as TCB_STATUSES
from blindinfer.attestation.intel.sgx_policy import MaskedValue as MaskedValue
from blindinfer.attestation.intel.sgx_policy import SgxPolicy as SgxPolicy
from blindinfer.attestation.intel.sgx_policy import sgx_policy_from_dict
from blindinfer.attestation.intel.tdx_policy import TdxPolicy
from blindinfer.attestation.nvidia.policy import NvidiaGpuPolicy
from blindinfer.attestation.policy_values import int_value as _int
from blindinfer.attestation.policy_values import no_unknown as _no_unknown
from blindinfer.attestation.policy_values import table_value as _table
from blindinfer.attestation.snp.policy import SnpPolicy
from blindinfer.errors import PolicyError

MAX_POLICY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Policy:
    """One section per evidence kind the client accepts; evidence of a kind without a
    section is refused. `gpu` adds requirements on NVIDIA GPU evidence (same nonce)."""

    sgx: SgxPolicy | None = None
    tdx: TdxPolicy | None = None
    snp: SnpPolicy | None = None
    gpu: NvidiaGpuPolicy | None = None
    max_collateral_age_days: int | None = None

    def __post_init__(self) -> None:
        if self.sgx is None and self.tdx is None and self.snp is None:
            raise PolicyError("a policy needs at least one of the [sgx], [tdx], [snp] sections")
        if self.snp is not None and not self.snp.measurement:
            raise PolicyError(
                "an [snp] section must pin snp.measurement (add measurement = "
                '["<96 hex digits>"], as `blindinfer measure --image DIR --platform snp` '
                "prints it): id_key_digest and author_key_digest are only checked in "
                "addition, since the key's owner may sign any image and blindinfer does not "
                "see the ID block the firmware checked"
            )
        if self.max_collateral_age_days is not None and self.max_collateral_age_days <= 0:
            raise PolicyError("max_collateral_age_days must be a positive integer")

    @classmethod
    def from_toml(cls, text: str, *, base_dir: Path | None = None) -> Policy:
        if len(text) > MAX_POLICY_BYTES:
            raise PolicyError("the policy file is too large")
        try:
            document = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError) as exc:
            raise PolicyError(f"the policy is not valid TOML: {exc}") from exc
        if looks_like_blindai_manifest(document):
            return cls.from_dict({"sgx": load_blindai_manifest(text)})
        return cls.from_dict(document, base_dir=base_dir)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read the policy file {path}: {exc}") from exc
        return cls.from_toml(text, base_dir=Path(path).parent)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, base_dir: Path | None = None) -> Policy:
        """`base_dir` resolves relative file names (GPU reference values) in the policy."""
        _no_unknown(document, {"sgx", "tdx", "snp", "gpu", "max_collateral_age_days"}, "policy")
        age = document.get("max_collateral_age_days")
        return cls(
            sgx=sgx_policy_from_dict(_table(document["sgx"], "sgx")) if "sgx" in document else None,
            tdx=TdxPolicy.from_dict(_table(document["tdx"], "tdx")) if "tdx" in document else None,
            snp=SnpPolicy.from_dict(_table(document["snp"], "snp")) if "snp" in document else None,
            gpu=NvidiaGpuPolicy.from_dict(_table(document["gpu"], "gpu"), base_dir=base_dir)
            if "gpu" in document
            else None,
            max_collateral_age_days=None if age is None else _int(age, "max_collateral_age_days"),
        )


def looks_like_blindai_manifest(document: Mapping[str, Any]) -> bool:
    """BlindAI Core's manifest.toml has top-level SGX keys and none of our sections."""
    return not ({"sgx", "tdx", "snp"} & document.keys()) and bool(
        BLINDAI_MANIFEST_KEYS & document.keys()
    )


def load_policy(source: Policy | str | Path | Mapping[str, Any]) -> Policy:
    """A Policy from a Policy, a TOML file path, or a dict shaped like the TOML."""
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return Policy.from_dict(source)
    return Policy.from_file(source)
