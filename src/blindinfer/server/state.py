"""Everything a request handler may touch, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from blindinfer.protocol.evidence import EvidenceDocument
from blindinfer.protocol.limits import TensorLimits
from blindinfer.server.config import ServerConfig
from blindinfer.server.tls import TlsIdentity
from blindinfer.store.memory import ModelStore
from blindinfer.tee.platform import REPORT_DATA_SIZE, Platform


@dataclass(frozen=True, slots=True)
class ServerState:
    config: ServerConfig
    platform: Platform
    identity: TlsIdentity
    store: ModelStore
    tensor_limits: TensorLimits

    def evidence_for(self, nonce: bytes) -> EvidenceDocument:
        """Evidence binding our TLS key (first half) and the caller's nonce (second half)."""
        report_data = self.identity.spki_sha256 + nonce
        assert len(report_data) == REPORT_DATA_SIZE
        evidence = self.platform.evidence(report_data)
        return EvidenceDocument(
            kind=evidence.kind,
            platform=self.platform.kind,
            nonce=nonce,
            quote=evidence.quote,
            collateral_json=evidence.collateral_json,
            certificate_der=self.identity.certificate_der,
            chip_certificates=evidence.certificates,
        )
