"""Everything a request handler may touch, built once at start-up."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from blindinfer.protocol.evidence import NONCE_SIZE, EvidenceDocument
from blindinfer.protocol.limits import TensorLimits
from blindinfer.protocol.receipts import (
    RECEIPT_VERSION,
    evidence_digest,
    measurement_of,
    sign_receipt,
)
from blindinfer.server.audit import AuditLog, AuditLogError
from blindinfer.server.auth import Action, Authenticator, Principal, authorize, visible_to
from blindinfer.server.config import ServerConfig
from blindinfer.server.offload import Offload
from blindinfer.server.quotas import TenantQuotas
from blindinfer.server.tls import TlsIdentity
from blindinfer.store.registry import ModelRegistry
from blindinfer.store.sealed import ModelRecord
from blindinfer.tee.platform import REPORT_DATA_SIZE, Platform

log = logging.getLogger("blindinfer.server")


@dataclass(frozen=True, slots=True)
class ServerState:
    config: ServerConfig
    platform: Platform
    identity: TlsIdentity
    registry: ModelRegistry
    tensor_limits: TensorLimits
    authenticator: Authenticator
    quotas: TenantQuotas
    audit: AuditLog
    auth_failures: FailureThrottle
    offload: Offload = field(default_factory=Offload, repr=False)  # threads per purpose
    _boot: list[EvidenceDocument] = field(default_factory=list, repr=False)
    _boot_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _listeners: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def add_listener_stop(self, stop: Callable[[], None]) -> None:
        """`stop` ends a listener beside the native one (gRPC, BlindAI's); shutdown calls it
        before the registry and the audit log close, so no late call finds them closed."""
        self._listeners.append(stop)

    def stop_listeners(self) -> None:
        while self._listeners:
            self._listeners.pop()()

    def boot_evidence(self) -> EvidenceDocument:
        """Evidence over an all-zero nonce, made once: receipts name its quote's digest."""
        with self._boot_lock:
            if not self._boot:
                self._boot.append(self.evidence_for(bytes(NONCE_SIZE)))
            return self._boot[0]

    @property
    def has_boot_evidence(self) -> bool:
        """Whether `boot_evidence()` returns at once (it makes a TEE quote the first time)."""
        return bool(self._boot)

    def receipt(self, kind: str, record: ModelRecord, **fields: Any) -> dict[str, str]:
        """A JWS receipt signed with the TLS key (see blindinfer.protocol.receipts)."""
        boot = self.boot_evidence()
        payload = {
            "v": RECEIPT_VERSION,
            "kind": kind,
            "request_id": fields.pop("request_id", None) or secrets.token_hex(16),
            "time": int(time.time()),
            "model": {"sha256": record.sha256, "model_id": record.model_id},
            "measurement": measurement_of(boot.kind, boot.quote),
            "evidence_digest": evidence_digest(boot.quote),
            **fields,
        }
        return sign_receipt(payload, self.identity.sign, self.identity.key_id)

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
            crl=evidence.crl,
        )

    def principal(self, request: Request) -> Principal:
        """Who is asking (401 otherwise), within their request rate (429 otherwise)."""
        try:
            principal = self.authenticator.authenticate(request.headers.get("authorization"))
        except Exception:
            self._auth_failed(_route_kind(request))
            raise
        self.quotas.check_rate(principal.tenant)
        return principal

    def principal_for(self, authorization: str | None, surface: str) -> Principal:
        """`principal` for a caller outside HTTP (gRPC metadata): the same key, audit and
        rate rules; `surface` names the API in the audit entry (never a model name)."""
        try:
            principal = self.authenticator.authenticate(authorization)
        except Exception:
            self._auth_failed(surface)
            raise
        self.quotas.check_rate(principal.tenant)
        return principal

    def _auth_failed(self, surface: str) -> None:
        suppressed = self.auth_failures.admit()
        if suppressed is not None:  # at most one entry a second: an fsync each
            detail: dict[str, str | int] = {"surface": surface, "since_last": suppressed}
            try:
                self.audit.record("auth_failure", detail=detail)
            except AuditLogError:
                # Still a 401: a full disk must not turn an unauthenticated caller's
                # answer into a 507 that tells it about the server's storage.
                log.warning("audit log unavailable: an authentication failure went unrecorded")

    def resolve(self, principal: Principal, ref: str) -> ModelRecord:
        """The model `ref` names among those the principal may see: another tenant's
        model and a missing one give the same 404 (registry.resolve)."""
        return self.registry.resolve(
            ref, principal.tenant, lambda r: visible_to(principal, r.owner, r.shared_with)
        )

    def model_for(self, principal: Principal, ref: str, action: Action) -> ModelRecord:
        record = self.resolve(principal, ref)
        authorize(principal, action, model_owner=record.owner, shared_with=record.shared_with)
        return record


class FailureThrottle:
    """Counts events; admits one a second, reporting how many were folded into it."""

    def __init__(
        self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval_s
        self._clock = clock
        self._last = -interval_s
        self._count = 0
        self._lock = threading.Lock()

    def admit(self) -> int | None:
        with self._lock:
            self._count += 1
            now = self._clock()
            if now - self._last < self._interval:
                return None
            self._last, folded, self._count = now, self._count, 0
            return folded


def _route_kind(request: Request) -> str:
    """The API surface, never the path itself (paths carry model names)."""
    parts = request.url.path.split("/")
    return "/".join(parts[:3])[:40]
