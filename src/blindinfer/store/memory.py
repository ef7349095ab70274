"""An in-memory model store with deduplication by content hash.

Identical uploads share one onnxruntime session: the store keeps one session per SHA-256
with a reference count, so re-uploading the same bytes under another name costs nothing.
Raw model bytes are not kept once the session exists.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blindinfer.runtime.session import ModelSession
from blindinfer.store.errors import ModelConflictError, StoreFullError, UnknownModelError
from blindinfer.store.names import check_name, is_model_id, is_sha256, new_model_id


@dataclass(frozen=True, slots=True)
class StoredModel:
    model_id: str
    name: str
    sha256: str
    size: int
    created_at: float
    session: ModelSession = field(repr=False, compare=False)


@dataclass(slots=True)
class _SharedSession:
    session: ModelSession
    references: int


SessionFactory = Callable[[bytes], ModelSession]


class ModelStore:
    def __init__(self, *, max_models: int, session_factory: SessionFactory = ModelSession) -> None:
        self._max_models = max_models
        self._make_session = session_factory
        self._lock = threading.Lock()
        self._by_id: dict[str, StoredModel] = {}
        self._by_name: dict[str, str] = {}
        self._sessions: dict[str, _SharedSession] = {}

    def add(self, data: bytes, sha256: str, name: str | None = None) -> tuple[StoredModel, bool]:
        """Stores a model; returns it and whether it is new.

        Re-uploading the same bytes under the same name is idempotent. The session is built
        outside the lock (it can take seconds); its result is only published under it.
        """
        if name is not None:
            check_name(name)
        with self._lock:
            existing = self._existing_or_check(name, sha256)
            if existing is not None:
                return existing, False
            shared = self._sessions.get(sha256)
        session = shared.session if shared is not None else self._make_session(data)
        with self._lock:
            existing = self._existing_or_check(name, sha256)
            if existing is not None:
                return existing, False
            shared = self._sessions.setdefault(sha256, _SharedSession(session, 0))
            shared.references += 1
            model_id = new_model_id()
            model = StoredModel(
                model_id=model_id,
                name=name or model_id,
                sha256=sha256,
                size=len(data),
                created_at=time.time(),
                session=shared.session,
            )
            self._by_id[model_id] = model
            self._by_name[model.name] = model_id
            return model, True

    def _existing_or_check(self, name: str | None, sha256: str) -> StoredModel | None:
        if name is not None and name in self._by_name:
            existing = self._by_id[self._by_name[name]]
            if existing.sha256 == sha256:
                return existing
            raise ModelConflictError(
                f"the name {name!r} is already used by another model "
                f"(sha256 {existing.sha256}); delete it first or choose another name"
            )
        if len(self._by_id) >= self._max_models:
            raise StoreFullError(
                f"the server holds its maximum of {self._max_models} models; delete one first"
            )
        return None

    def resolve(self, ref: str) -> StoredModel:
        """Finds a model by model_id, SHA-256 (any model with those bytes) or name."""
        with self._lock:
            return self._resolve_locked(ref)

    def _resolve_locked(self, ref: str) -> StoredModel:
        if is_model_id(ref):
            model = self._by_id.get(ref)
        elif is_sha256(ref):
            model = next((m for m in self._by_id.values() if m.sha256 == ref), None)
        else:
            model_id = self._by_name.get(ref)
            model = self._by_id.get(model_id) if model_id is not None else None
        if model is None:
            raise UnknownModelError(f"no model is known as {ref[:140]!r}")
        return model

    def delete(self, ref: str) -> StoredModel:
        with self._lock:
            model = self._resolve_locked(ref)
            del self._by_id[model.model_id]
            del self._by_name[model.name]
            shared = self._sessions[model.sha256]
            shared.references -= 1
            if shared.references == 0:
                del self._sessions[model.sha256]
            return model

    def models(self) -> list[StoredModel]:
        with self._lock:
            return sorted(self._by_id.values(), key=lambda m: (m.created_at, m.model_id))

    @property
    def distinct_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)
