"""The TLS keys a client has attested for one URL: one server, or replicas behind a balancer.

Behind a TCP load balancer each replica has its own TLS key and its own evidence, and any
new connection may land on any of them. A client pinned to the first key it attested would
refuse every other replica; a client that trusted the balancer would trust nothing at all.
So the client keeps a bounded set of keys, each admitted only by evidence that verified
(fresh nonce, same policy) on a connection that presented that very key, and it checks
every new connection's key against the set before it writes a request byte on it.

Bounds, so that the set cannot become a stale allow-list:
- `max_keys`: at most this many keys are trusted at once; admitting one more forgets the
  longest-attested one (its next connection is attested again).
- `max_age_seconds`: a key attested longer ago than this is no longer trusted; the next
  connection that presents it is attested again, with a fresh nonce.
With `max_keys=1` (what `connect()` does unless told `replicas=`), a second key is never
admitted: the client stays pinned to the one key it attested, as a single server demands.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from blindinfer.attestation.bundle import EvidenceBundle
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.errors import UsageError

DEFAULT_MAX_AGE_SECONDS = 3600.0
"""How long one attestation of a replica's key is trusted before it is attested again."""

MAX_REPLICAS = 256
"""The largest replica set a client accepts (each key costs one attestation and ~10 KB)."""


@dataclass(frozen=True, slots=True)
class AttestedKey:
    """One admitted key: the attestation that admitted it, and when (monotonic seconds).

    `boot_evidence`: the replica's boot evidence document as read on a connection that
    presented this key (unverified bytes: receipts verify it when they name it)."""

    attestation: VerifiedAttestation
    bundle: EvidenceBundle | None
    attested_at: float
    boot_evidence: bytes | None = None

    @property
    def certificate_der(self) -> bytes:
        return self.attestation.certificate_der


def check_replicas(replicas: object) -> int:
    """`replicas` as a key bound; a UsageError unless an int from 1 to MAX_REPLICAS."""
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise UsageError(f"replicas must be an integer from 1 to {MAX_REPLICAS}, got {replicas!r}")
    if not 1 <= replicas <= MAX_REPLICAS:
        raise UsageError(f"replicas must be from 1 to {MAX_REPLICAS}, got {replicas}")
    return replicas


class AttestedKeys:
    """A bounded, thread-safe set of attested TLS certificates (module docstring)."""

    def __init__(
        self,
        *,
        max_keys: int = 1,
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_keys = check_replicas(max_keys)
        if not max_age_seconds > 0:
            raise UsageError(f"max_age_seconds must be positive, got {max_age_seconds!r}")
        self.max_age_seconds = float(max_age_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[bytes, AttestedKey] = {}
        self._first: AttestedKey | None = None

    def lookup(self, certificate_der: bytes) -> AttestedKey | None:
        """The key's admission if it is in the set and young enough; else None (and a
        stale entry is dropped, so that only a fresh attestation admits it again)."""
        digest = _digest(certificate_der)
        with self._lock:
            known = self._keys.get(digest)
            if known is None:
                return None
            if self._clock() - known.attested_at > self.max_age_seconds:
                del self._keys[digest]
                return None
            return known

    def admits_another(self, certificate_der: bytes) -> bool:
        """Whether a key not in the set may be attested and admitted (False when the client
        is pinned to exactly one key and that key is another one, still trusted)."""
        if self.max_keys > 1:
            return True
        with self._lock:
            return not self._keys or _digest(certificate_der) in self._keys

    def admit(
        self,
        attestation: VerifiedAttestation,
        bundle: EvidenceBundle | None = None,
        boot_evidence: bytes | None = None,
    ) -> AttestedKey:
        """Adds the key that `attestation` verified (it carries the certificate it bound),
        forgetting the longest-attested one when the set is full."""
        admitted = AttestedKey(attestation, bundle, self._clock(), boot_evidence)
        digest = _digest(attestation.certificate_der)
        with self._lock:
            self._keys.pop(digest, None)
            while len(self._keys) >= self.max_keys:
                oldest = min(self._keys, key=lambda d: self._keys[d].attested_at)
                del self._keys[oldest]
            self._keys[digest] = admitted
            if self._first is None:
                self._first = admitted
        return admitted

    def forget(self, certificate_der: bytes) -> None:
        with self._lock:
            self._keys.pop(_digest(certificate_der), None)

    @property
    def first(self) -> AttestedKey | None:
        """The key attested at connect (what `Client.attestation` reports)."""
        return self._first

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def admitted(self) -> list[AttestedKey]:
        """The keys trusted now, oldest first (for status pages and tests)."""
        with self._lock:
            keys = list(self._keys.values())
        now = self._clock()
        return sorted(
            (k for k in keys if now - k.attested_at <= self.max_age_seconds),
            key=lambda k: k.attested_at,
        )


def _digest(certificate_der: bytes) -> bytes:
    return hashlib.sha256(certificate_der).digest()
