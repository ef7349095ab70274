"""The model registry: which models exist, who owns them, which are in memory.

Every accepted model is sealed to disk before the upload is acknowledged (`SealedStore`),
so memory only holds what is in use: onnxruntime sessions in the worker processes, under a
server-wide budget of *measured* bytes (the worker's RSS growth when it built the session).
When loading a model would exceed the budget, the least recently used models are evicted
(their sessions dropped; the sealed copy stays) and reloaded on their next use. Identical
bytes share one sealed blob and one session, whoever uploaded them.

Authorization is not decided here (routes do it with `server.auth`); quotas neither. This
module keeps the invariants: names unique per owner, sealed before acknowledged, the budget
never exceeded by what is loaded.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blindinfer.runtime.errors import OverloadedError
from blindinfer.runtime.signature import ModelSignature
from blindinfer.runtime.workers import WorkerPool
from blindinfer.store.errors import (
    MemoryBudgetError,
    ModelConflictError,
    StoreFullError,
    UnknownModelError,
)
from blindinfer.store.names import check_name, is_model_id, is_sha256, new_model_id
from blindinfer.store.sealed import ModelRecord, SealedStore

AuditHook = Callable[..., object]


@dataclass(frozen=True, slots=True)
class RegistryStats:
    models: int
    loaded: int
    memory_budget: int
    memory_used: int
    stored_bytes: int


class ModelRegistry:
    def __init__(
        self,
        *,
        sealed: SealedStore,
        pool: WorkerPool,
        memory_budget: int,
        max_models: int,
        audit: AuditHook | None = None,
    ) -> None:
        self._sealed = sealed
        self._pool = pool
        self._budget = memory_budget
        self._max_models = max_models
        self._audit = audit or (lambda *args, **kwargs: None)
        self._lock = threading.RLock()
        self._records: dict[str, ModelRecord] = {r.model_id: r for r in sealed.records()}
        self._loaded: OrderedDict[str, int] = OrderedDict()  # sha256 -> measured bytes
        self._cost: dict[str, int] = {}  # last measured cost per sha256, kept after eviction
        self._signatures: dict[str, ModelSignature] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._in_use: Counter[str] = Counter()  # sha256 -> requests running on it
        for record in self._records.values():
            self._audit(
                "restore", tenant=record.owner, model_id=record.model_id, sha256=record.sha256
            )

    @property
    def directory(self) -> Path:
        return self._sealed.directory

    def close(self) -> None:
        self._pool.close()

    def pool_stats(self) -> list[dict[str, object]]:
        return [dataclasses.asdict(s) for s in self._pool.stats()]

    # -- lookups -------------------------------------------------------------------------

    def resolve(self, ref: str, tenant: str) -> ModelRecord:
        """By model_id; by SHA-256 (the caller's own model first); by name in `tenant`."""
        with self._lock:
            records = list(self._records.values())
        if is_model_id(ref):
            found = self._records.get(ref)
        elif is_sha256(ref):
            same = [r for r in records if r.sha256 == ref]
            found = next((r for r in same if r.owner == tenant), same[0] if same else None)
        else:
            found = next((r for r in records if r.owner == tenant and r.name == ref), None)
        if found is None:
            raise UnknownModelError(f"no model is known as {ref[:140]!r}")
        return found

    def records(
        self, visible_to: Callable[[ModelRecord], bool] = lambda r: True
    ) -> list[ModelRecord]:
        with self._lock:
            return sorted(
                (r for r in self._records.values() if visible_to(r)),
                key=lambda r: (r.created_at, r.model_id),
            )

    def usage(self, tenant: str) -> tuple[int, int]:
        """(number of models, stored bytes) owned by `tenant`."""
        with self._lock:
            owned = [r for r in self._records.values() if r.owner == tenant]
        return len(owned), sum(r.size for r in owned)

    def signature(self, record: ModelRecord) -> ModelSignature:
        if record.sha256 not in self._signatures:
            self._ensure_loaded(record)
        return self._signatures[record.sha256]

    def stats(self) -> RegistryStats:
        with self._lock:
            return RegistryStats(
                models=len(self._records),
                loaded=len(self._loaded),
                memory_budget=self._budget,
                memory_used=sum(self._loaded.values()),
                stored_bytes=self._sealed.used_bytes,
            )

    # -- changes -------------------------------------------------------------------------

    def add(
        self,
        data: bytes,
        sha256: str,
        *,
        name: str | None,
        owner: str,
        shared_with: Collection[str] = (),
    ) -> tuple[ModelRecord, bool]:
        """Validates (in a worker), seals, then publishes; idempotent for identical bytes."""
        if name is not None:
            check_name(name)
        existing = self._existing(name, owner, sha256)
        if existing is not None:
            return existing, False
        if sha256 not in self._signatures:
            loaded = self._pool.validate_and_load(sha256, data)
            self._account(sha256, loaded.memory_bytes, loaded.signature)
        model_id = new_model_id()
        record = ModelRecord(
            model_id=model_id,
            name=name or model_id,
            sha256=sha256,
            owner=owner,
            size=len(data),
            created_at=time.time(),
            shared_with=tuple(sorted(set(shared_with))),
        )
        with self._lock:
            try:
                existing = self._existing(name, owner, sha256)
                if existing is not None:
                    return existing, False
                self._sealed.put(record, data)  # durable before it is acknowledged
            except BaseException:
                self._forget_if_orphan(sha256)
                raise
            self._records[model_id] = record
        self._audit(
            "upload", tenant=owner, model_id=model_id, sha256=sha256, detail={"size": len(data)}
        )
        return record, True

    def _existing(self, name: str | None, owner: str, sha256: str) -> ModelRecord | None:
        with self._lock:
            if name is not None:
                same = next(
                    (r for r in self._records.values() if r.owner == owner and r.name == name), None
                )
                if same is not None:
                    if same.sha256 == sha256:
                        return same
                    raise ModelConflictError(
                        f"the name {name!r} is already used by another model "
                        f"(sha256 {same.sha256}); delete it first or choose another name"
                    )
            if len(self._records) >= self._max_models:
                raise self._full()
        return None

    def check_room(self, name: str | None, owner: str) -> None:
        """Refuses (StoreFullError), before any bytes arrive, an upload that a full store
        could not take: on a full store only re-sending a model under its own name can
        succeed. `add` decides again with the bytes (other uploads may land meanwhile)."""
        with self._lock:
            if len(self._records) < self._max_models:
                return
            if name is not None and any(
                r.owner == owner and r.name == name for r in self._records.values()
            ):
                return
            raise self._full()

    def _full(self) -> StoreFullError:
        return StoreFullError(
            f"the server holds its maximum of {self._max_models} models; delete one first"
        )

    def _forget_if_orphan(self, sha256: str) -> bool:
        """Drops the session of a hash no record uses any more (call with the lock held)."""
        if any(r.sha256 == sha256 for r in self._records.values()):
            return False
        self._signatures.pop(sha256, None)
        self._cost.pop(sha256, None)
        if self._loaded.pop(sha256, None) is not None:
            self._pool.unload(sha256)
        return True

    def delete(self, record: ModelRecord) -> None:
        with self._lock:
            if record.model_id not in self._records:
                raise UnknownModelError(f"no model is known as {record.model_id!r}")
            self._sealed.delete(record.model_id)
            del self._records[record.model_id]
            self._forget_if_orphan(record.sha256)
        self._audit("delete", tenant=record.owner, model_id=record.model_id, sha256=record.sha256)

    def share(self, record: ModelRecord, tenants: Collection[str]) -> ModelRecord:
        shared = dataclasses.replace(record, shared_with=tuple(sorted(set(tenants))))
        with self._lock:
            self._sealed.update_record(shared)
            self._records[record.model_id] = shared
        self._audit(
            "share",
            tenant=record.owner,
            model_id=record.model_id,
            sha256=record.sha256,
            detail={"tenants": ",".join(shared.shared_with)[:200]},
        )
        return shared

    # -- execution -----------------------------------------------------------------------

    def run(
        self,
        record: ModelRecord,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        sha = record.sha256
        self._pin(record)
        try:
            return self._pool.run(sha, dict(inputs), list(outputs) if outputs else None)
        finally:
            with self._lock:
                self._in_use[sha] -= 1
                if self._in_use[sha] <= 0:
                    del self._in_use[sha]

    def _pin(self, record: ModelRecord) -> None:
        """Loads the model and marks it in use, so that no other request evicts it before
        its run reaches the worker."""
        for _ in range(3):
            self._ensure_loaded(record)
            with self._lock:
                if record.sha256 in self._loaded:
                    self._in_use[record.sha256] += 1
                    self._loaded.move_to_end(record.sha256)
                    return
        raise OverloadedError(
            "the memory budget is contended: this model was evicted before it could run",
            retry_after_s=1.0,
        )

    def source(self, sha256: str) -> bytes:
        """The sealed bytes of any model with this hash: how workers reload after a crash."""
        with self._lock:
            record = next((r for r in self._records.values() if r.sha256 == sha256), None)
        if record is None:
            raise UnknownModelError(f"no stored model has sha256 {sha256}")
        return self._sealed.get(record.model_id)

    def _ensure_loaded(self, record: ModelRecord) -> None:
        sha = record.sha256
        with self._lock:
            if sha in self._loaded:
                self._loaded.move_to_end(sha)
                return
            gate = self._loading.setdefault(sha, threading.Lock())
        with gate:  # one load per model at a time; others wait for it
            with self._lock:
                if sha in self._loaded:
                    self._loaded.move_to_end(sha)
                    return
                # make room for what it cost last time (or twice its size) before loading
                if not self._evict_for(self._cost.get(sha, 2 * record.size), keep=sha):
                    raise OverloadedError(
                        "every loaded model is in use and the memory budget is full",
                        retry_after_s=1.0,
                    )
            loaded = self._pool.load(sha, self._sealed.get(record.model_id))
            self._account(sha, loaded.memory_bytes, loaded.signature)
            with self._lock:
                self._loading.pop(sha, None)
                orphan = self._forget_if_orphan(sha)  # deleted while it was loading
            if orphan:
                return
            self._audit(
                "restore",
                tenant=record.owner,
                model_id=record.model_id,
                sha256=sha,
                detail={"memory_bytes": loaded.memory_bytes},
            )

    def _account(self, sha256: str, cost: int, signature: ModelSignature) -> None:
        with self._lock:
            if cost > self._budget:
                self._pool.unload(sha256)
                raise MemoryBudgetError(
                    f"the model needs {cost} bytes of memory once loaded; the server's model "
                    f"memory budget is {self._budget} bytes"
                )
            self._signatures[sha256] = signature
            self._cost[sha256] = cost
            self._loaded[sha256] = cost
            self._loaded.move_to_end(sha256)
            self._evict_for(0, keep=sha256)

    def _evict_for(self, incoming: int, *, keep: str) -> bool:
        """Evicts least recently used idle sessions until `incoming` more bytes fit the
        budget; False if the models in use leave no room."""
        while sum(self._loaded.values()) + incoming > self._budget:
            victim = next((s for s in self._loaded if s != keep and s not in self._in_use), None)
            if victim is None:
                return False
            freed = self._loaded.pop(victim)
            self._pool.unload(victim)
            self._audit("evict", sha256=victim, detail={"memory_bytes": freed})
        return True
