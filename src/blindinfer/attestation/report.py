"""The result of a successful verification: what the client now knows about the server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

Claim = str | int | bool


@dataclass(frozen=True, slots=True)
class GpuSummary:
    kind: str
    measurements: int
    claims: Mapping[str, Claim] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class VerifiedAttestation:
    """Authentic, fresh, bound evidence that satisfied the policy.

    `claims` holds every measured field of the evidence (bytes as hex) under the names the
    policy uses, e.g. "mrenclave" for SGX, "mrtd" for TDX, "measurement" for SNP.
    """

    kind: str
    root: str
    simulation: bool
    tcb_status: str
    advisory_ids: tuple[str, ...]
    claims: Mapping[str, Claim]
    report_data: bytes
    certificate_der: bytes
    nonce: bytes
    verified_at: int
    gpus: tuple[GpuSummary, ...] = ()

    def _bytes(self, name: str) -> bytes:
        value = self.claims.get(name)
        if not isinstance(value, str):
            raise AttributeError(f"{self.kind} evidence has no {name}")
        return bytes.fromhex(value)

    def _int(self, name: str) -> int:
        value = self.claims.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise AttributeError(f"{self.kind} evidence has no {name}")
        return value

    @property
    def mrenclave(self) -> bytes:
        return self._bytes("mrenclave")

    @property
    def mrsigner(self) -> bytes:
        return self._bytes("mrsigner")

    @property
    def isvprodid(self) -> int:
        return self._int("isvprodid")

    @property
    def isvsvn(self) -> int:
        return self._int("isvsvn")

    @property
    def debug(self) -> bool:
        return bool(self.claims.get("debug", False))

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "root": self.root,
            "simulation": self.simulation,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "claims": dict(self.claims),
            "report_data": self.report_data.hex(),
            "nonce": self.nonce.hex(),
            "verified_at": self.verified_at,
            "gpus": [
                {"kind": g.kind, "measurements": g.measurements, "claims": dict(g.claims)}
                for g in self.gpus
            ],
        }

    def summary(self) -> str:
        head = (
            "SIMULATION (no TEE, no confidentiality)"
            if self.simulation
            else "verified TEE evidence"
        )
        advisories = f" (advisories: {', '.join(self.advisory_ids)})" if self.advisory_ids else ""
        lines = [
            head,
            f"  evidence      {self.kind}, chain to {self.root}",
            f"  TCB status    {self.tcb_status}{advisories}",
        ]
        lines += [f"  {name:<13} {value}" for name, value in self.claims.items()]
        lines += [
            f"  TLS key bound report_data[0:32] = {self.report_data[:32].hex()}",
            f"  fresh nonce   report_data[32:64] = {self.nonce.hex()}",
        ]
        lines += [
            f"  GPU           {g.kind}, {g.measurements} measurements verified" for g in self.gpus
        ]
        return "\n".join(lines)
