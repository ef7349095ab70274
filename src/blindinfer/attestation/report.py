"""The result of a successful verification: what the client now knows about the server."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class VerifiedAttestation:
    kind: str
    root: str
    simulation: bool
    tcb_status: str
    advisory_ids: tuple[str, ...]
    mrenclave: bytes
    mrsigner: bytes
    isvprodid: int
    isvsvn: int
    attributes: bytes
    miscselect: bytes
    debug: bool
    report_data: bytes
    certificate_der: bytes
    nonce: bytes
    verified_at: int

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "root": self.root,
            "simulation": self.simulation,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "mrenclave": self.mrenclave.hex(),
            "mrsigner": self.mrsigner.hex(),
            "isvprodid": self.isvprodid,
            "isvsvn": self.isvsvn,
            "attributes": self.attributes.hex(),
            "miscselect": self.miscselect.hex(),
            "debug": self.debug,
            "report_data": self.report_data.hex(),
            "nonce": self.nonce.hex(),
            "verified_at": self.verified_at,
        }

    def summary(self) -> str:
        lines = [
            "SIMULATION (no TEE, no confidentiality)"
            if self.simulation
            else "verified TEE evidence",
            f"  evidence      {self.kind}, chain to {self.root}",
            f"  TCB status    {self.tcb_status}"
            + (f" (advisories: {', '.join(self.advisory_ids)})" if self.advisory_ids else ""),
            f"  MRENCLAVE     {self.mrenclave.hex()}",
            f"  MRSIGNER      {self.mrsigner.hex()}",
            f"  ISVPRODID     {self.isvprodid}   ISVSVN {self.isvsvn}",
            f"  debug         {'yes' if self.debug else 'no'}",
            f"  TLS key bound report_data[0:32] = {self.report_data[:32].hex()}",
            f"  fresh nonce   report_data[32:64] = {self.nonce.hex()}",
        ]
        return "\n".join(lines)
