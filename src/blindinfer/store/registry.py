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

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import numpy as np

from blindinfer.protocol.generation import SamplingParams, Usage
from blindinfer.runtime.errors import (
    GenerationRequestError,
    InvalidTensorError,
    OverloadedError,
)
from blindinfer.runtime.response_size import OutputEncoding
from blindinfer.runtime.signature import ModelSignature
from blindinfer.runtime.workers import LoadedModel, ModelNotPlacedError, WorkerPool
from blindinfer.store.errors import (
    MemoryBudgetError,
    ModelConflictError,
    StoreFullError,
    TenantMemoryQuotaError,
    UnknownModelError,
)
from blindinfer.store.names import check_name, is_model_id, is_sha256, new_model_id
from blindinfer.store.sealed import ModelRecord, SealedStore, StagedBlob

AuditHook = Callable[..., object]


Admit = Callable[[int, int, int], None]
"""An owner's upload quota: (models held, bytes held, new bytes) -> None, or raises."""


def unknown_model_message(ref: str) -> str:
    """The one answer for a reference that names nothing the caller can see, whether
    the model does not exist or belongs to another tenant."""
    return f"no model is visible to this API key as {ref[:140]!r}"


def _everything(record: ModelRecord) -> bool:
    return True


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class GenerationEnd:
    """The end of a generation: "stop", "length" or "cancelled", its token counts and its
    token ids (the prompt as fed to the model, every generated token), which a generation's
    receipt signs (`blindinfer.protocol.receipts.generation_payload`)."""

    finish_reason: str
    usage: Usage
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()


GenerationEvent = str | GenerationEnd
"""What `generate_async` yields: pieces of text, then one GenerationEnd."""

GenerationOutcome = Usage | BaseException | None
"""What `generate_async(on_end=...)` reports: the worker's token counts, the exception the
generation ended in, or None when it never reached a worker."""


def _outcome(done: Future[dict[str, object]]) -> GenerationOutcome:
    if done.cancelled():
        return asyncio.CancelledError()
    failure = done.exception()
    if failure is not None:
        return failure
    final = done.result()
    return Usage(
        prompt_tokens=int(final["prompt_tokens"]),  # type: ignore[call-overload]
        completion_tokens=int(final["completion_tokens"]),  # type: ignore[call-overload]
    )


def _tensor_only(record: ModelRecord) -> None:
    """Refuses a tensor run of a generative model before anything loads (its worker holds
    no onnxruntime session to run: that was a 500)."""
    if record.kind != "tensor":
        raise InvalidTensorError(
            "not_tensor_model",
            "this model is a generative model: use POST /v2/models/{name}/generate or "
            "/v1/completions",
        )


def _discard_staged(sealed: SealedStore, staging: Future[StagedBlob]) -> None:
    """Waits for a cancelled sealing to stop and removes what it staged, if anything:
    an upload refused by validation leaves no file behind when the refusal is sent."""
    try:
        staged = staging.result()
    except BaseException:  # cancelled, or failed: it removed its own file
        return
    sealed.discard(staged)


async def _wait(future: Future[_T]) -> _T:
    """Awaits a thread's future without holding a thread. A cancelled request (its client
    went away) stops waiting, never the work others may share; whatever that work ends
    in is then collected, so that no 'exception never retrieved' reaches the logs."""
    wrapped = asyncio.wrap_future(future)
    wrapped.add_done_callback(lambda f: None if f.cancelled() else f.exception())
    return await asyncio.shield(wrapped)


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
        tenant_memory: Callable[[str], int | None] | None = None,
    ) -> None:
        """`tenant_memory(tenant)`: the most loaded-session bytes charged to `tenant`
        (None: no limit of its own), see `_evict_for`."""
        self._sealed = sealed
        self._pool = pool
        self._budget = memory_budget
        self._max_models = max_models
        self._audit = audit or (lambda *args, **kwargs: None)
        # `_lock` guards the maps below and is what every request takes to resolve its
        # model: it is never held while waiting for a worker, a load or the disk.
        # `_write_lock` serializes the changes that seal to disk (add, delete, share).
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        synced, stored = sealed.snapshot()
        self._records: dict[str, ModelRecord] = {r.model_id: r for r in stored}
        self._synced = synced  # the store's counter `_records` reflects (sync_from_store)
        self._loaded: OrderedDict[str, int] = OrderedDict()  # sha256 -> measured bytes
        self._cost: dict[str, int] = {}  # last measured cost per sha256, kept after eviction
        self._signatures: dict[str, ModelSignature] = {}
        # generative models: sha256 -> (context length, KV bytes per token), kept after eviction
        self._shapes: dict[str, tuple[int, int]] = {}
        self._loading: dict[str, Future[None]] = {}  # sha256 -> its load in flight
        # Loads wait for a worker (up to the load timeout): on threads of their own, one
        # per model being loaded, however many requests wait for it.
        self._loader = ThreadPoolExecutor(max_workers=8, thread_name_prefix="blindinfer-load")
        # uploads seal on these while their worker validates (`_add_reserved`)
        self._stager = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blindinfer-seal")
        self._evicted: list[tuple[str, int]] = []  # audited once the lock is released
        self._in_use: Counter[str] = Counter()  # sha256 -> requests running on it
        self._reserved: Counter[str] = Counter()  # owner -> uploads in flight (see add)
        self._reserved_bytes: Counter[str] = Counter()  # owner -> their bytes
        self._tenant_memory = tenant_memory or (lambda tenant: None)
        # sha256 -> the tenant its loaded session is charged to: the owner of the record
        # whose upload or run loaded it. Only entries of `_loaded` count; stale ones are
        # ignored (and overwritten at the next load).
        self._charged: dict[str, str] = {}
        for record in self._records.values():
            self._audit(
                "restore", tenant=record.owner, model_id=record.model_id, sha256=record.sha256
            )

    @property
    def directory(self) -> Path:
        return self._sealed.directory

    def close(self) -> None:
        self._pool.close()
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._stager.shutdown(wait=False, cancel_futures=True)

    def pool_stats(self) -> list[dict[str, object]]:
        return [dataclasses.asdict(s) for s in self._pool.stats()]

    # -- lookups -------------------------------------------------------------------------

    def resolve(
        self, ref: str, tenant: str, visible: Callable[[ModelRecord], bool] | None = None
    ) -> ModelRecord:
        """By model_id; by SHA-256 (the caller's own model first, else the oldest it can
        see); by name in `tenant`.

        Only the records `visible` accepts (all without it) are candidates, and every
        reference takes the same path (filter, then match): a model the caller may not see
        and one that does not exist end in the very same `unknown_model` error, so that a
        404 tells no tenant anything about another's models, and a hash shared by a hidden
        record and a visible one finds the visible one."""
        accept = visible or _everything
        self._follow_store()
        with self._lock:
            records = [r for r in self._records.values() if accept(r)]
        if is_model_id(ref):
            found = next((r for r in records if r.model_id == ref), None)
        elif is_sha256(ref):
            same = [r for r in records if r.sha256 == ref]
            found = next((r for r in same if r.owner == tenant), same[0] if same else None)
        else:
            found = next((r for r in records if r.owner == tenant and r.name == ref), None)
        if found is None:
            raise UnknownModelError(unknown_model_message(ref))
        return found

    def records(
        self, visible_to: Callable[[ModelRecord], bool] = lambda r: True
    ) -> list[ModelRecord]:
        self._follow_store()
        with self._lock:
            return sorted(
                (r for r in self._records.values() if visible_to(r)),
                key=lambda r: (r.created_at, r.model_id),
            )

    def usage(self, tenant: str) -> tuple[int, int]:
        """(number of models, stored bytes) owned by `tenant`, counting its uploads in
        flight (their room is reserved: see `add`)."""
        with self._lock:
            return self._usage_locked(tenant)

    def signature(self, record: ModelRecord) -> ModelSignature:
        """The model's inputs and outputs; loads it (waiting) if it never was."""
        for _ in range(3):
            found = self._signatures.get(record.sha256)
            if found is not None:
                return found
            self._ensure_loaded(record)
        self._check_stored(record)
        raise self._contended()

    async def signature_async(self, record: ModelRecord) -> ModelSignature:
        """`signature` for the event loop: waiting for a load holds no thread."""
        for _ in range(3):
            found = self._signatures.get(record.sha256)
            if found is not None:
                return found
            pending = self.loading(record)
            if pending is not None:
                await _wait(pending)
            else:
                self._check_stored(record)
        self._check_stored(record)
        raise self._contended()

    def stats(self) -> RegistryStats:
        with self._lock:
            # stored bytes from the records (distinct blobs), not from the sealed store:
            # its lock is held while an upload is written and fsynced
            blobs = {r.sha256: r.size for r in self._records.values()}
            return RegistryStats(
                models=len(self._records),
                loaded=len(self._loaded),
                memory_budget=self._budget,
                memory_used=sum(self._loaded.values()),
                stored_bytes=sum(blobs.values()),
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
        admit: Admit | None = None,
        kind: str = "tensor",
    ) -> tuple[ModelRecord, bool]:
        """Validates (in a worker), seals, then publishes; idempotent for identical bytes
        under the same name and owner.

        `admit(models, stored_bytes, new_bytes)` is the owner's quota (it raises to
        refuse): it is asked under the registry lock with what the owner holds *and has
        in flight*, and the upload's room (one model, its bytes, one slot of the store's
        `max_models`) stays reserved until the model is published or refused, so that
        parallel uploads can never together exceed a quota or the store."""
        if name is not None:
            check_name(name)
        self._follow_store()
        existing = self._existing(name, owner, sha256)
        if existing is not None:
            return existing, False
        self._reserve(owner, len(data), admit)
        try:
            return self._add_reserved(
                data,
                sha256,
                name=name,
                owner=owner,
                shared_with=shared_with,
                kind=kind,
                admit=admit,
            )
        finally:
            self._unreserve(owner, len(data))

    def _add_reserved(
        self,
        data: bytes,
        sha256: str,
        *,
        name: str | None,
        owner: str,
        shared_with: Collection[str],
        kind: str = "tensor",
        admit: Admit | None = None,
    ) -> tuple[ModelRecord, bool]:
        """`add` once the upload's room is reserved: validate and seal at once, publish.

        The bytes are sealed to a staged file on a thread of their own while a worker
        validates them (the two took one after the other: docs/performance.md); the
        staged blob is committed only once validation passed, and removed otherwise.
        Staged unless the owner already holds these bytes: for bytes only another tenant
        holds, the upload takes the same time as a first one."""
        cancel = threading.Event()
        staging = (
            None
            if self._owner_holds(sha256, owner)
            else self._stager.submit(self._sealed.stage_blob, sha256, data, cancel=cancel)
        )
        try:
            self._validate(data, sha256, owner, kind)
        except BaseException:
            if staging is not None:  # stops within a chunk; nothing is left behind
                cancel.set()
                _discard_staged(self._sealed, staging)
            raise
        try:
            staged = None if staging is None else staging.result()
        except BaseException:  # as a failed `put` would: drop the validated session
            with self._lock:
                self._forget_if_orphan(sha256)
            raise
        try:
            return self._publish(
                data,
                sha256,
                staged,
                name=name,
                owner=owner,
                shared_with=shared_with,
                kind=kind,
                admit=admit,
            )
        finally:
            if staged is not None:
                self._sealed.discard(staged)  # unless it was renamed into place

    def _owner_holds(self, sha256: str, owner: str) -> bool:
        """Whether `owner` already has a validated model with these bytes (`_validate`)."""
        with self._lock:
            return sha256 in self._signatures and any(
                r.owner == owner and r.sha256 == sha256 for r in self._records.values()
            )

    def _publish(
        self,
        data: bytes,
        sha256: str,
        staged: StagedBlob | None,
        *,
        name: str | None,
        owner: str,
        shared_with: Collection[str],
        kind: str,
        admit: Admit | None = None,
    ) -> tuple[ModelRecord, bool]:
        """Seals (or commits the staged blob), durably and audited, then publishes.

        Under the store's writer lock (`SealedStore.writing`), after `sync_from_store`:
        the name and the quotas are decided again on what every replica committed, and
        hold until this commit."""
        model_id = new_model_id()
        record = ModelRecord(
            model_id=model_id,
            name=name or model_id,
            sha256=sha256,
            owner=owner,
            size=len(data),
            created_at=time.time(),
            shared_with=tuple(sorted(set(shared_with))),
            kind=kind,
        )
        # not `_lock`: sealing writes and fsyncs
        with self._write_lock, self._sealed.writing():
            try:
                self.sync_from_store()
                existing = self._existing(name, owner, sha256)
                if existing is not None:
                    return existing, False
                self._recheck_room(owner, len(data), admit)

                # durable before it is acknowledged, and audited before it is committed:
                # an upload whose audit entry cannot be written leaves nothing stored
                def audit() -> None:
                    self._audit(
                        "upload",
                        tenant=owner,
                        model_id=model_id,
                        sha256=sha256,
                        detail={"size": len(data)},
                    )

                if staged is not None:
                    self._sealed.put_staged(record, staged, before_commit=audit)
                else:
                    self._sealed.put(record, data, before_commit=audit)
            except BaseException:
                with self._lock:
                    self._forget_if_orphan(sha256)
                raise
            counter = self._sealed.counter
            with self._lock:
                self._records[model_id] = record
                self._synced = counter
        return record, True

    def _pool_load(
        self, key: str, data: bytes | bytearray, kind: str, *, check: bool
    ) -> LoadedModel:
        """The pool's load (or validating load); `kind` is passed only where it matters."""
        load = self._pool.validate_and_load if check else self._pool.load
        loaded = load(key, data) if kind == "tensor" else load(key, data, kind)
        if loaded.context_length is not None and loaded.kv_bytes_per_token is not None:
            with self._lock:  # keyed by the hash (a checking load's key starts with it)
                self._shapes[key.split(":", 1)[0]] = (
                    loaded.context_length,
                    loaded.kv_bytes_per_token,
                )
        return loaded

    def _validate(self, data: bytes, sha256: str, owner: str, kind: str = "tensor") -> None:
        """Checks the bytes in a worker unless their owner already holds a validated copy.

        Never skipped for bytes that only *another* tenant holds: how long an upload takes
        must not tell whether someone else stored the same model. Where another tenant's
        session of these bytes is live, the check loads a separate session (same work as
        a first upload) and drops it, leaving the live one untouched."""
        with self._lock:
            known = sha256 in self._signatures
            own = known and any(
                r.owner == owner and r.sha256 == sha256 for r in self._records.values()
            )
            live = sha256 in self._loaded
        if own:
            return
        if not live:
            loaded = self._pool_load(sha256, data, kind, check=True)
            self._account(sha256, loaded.memory_bytes, loaded.signature, owner=owner)
            return
        check_key = f"{sha256}:check:{new_model_id()}"
        try:
            checked = self._pool_load(check_key, data, kind, check=True)
        finally:
            self._pool.unload(check_key)
        with self._lock:  # the same refusals as a first upload, not knowing the other copy
            if checked.memory_bytes > self._budget:
                raise MemoryBudgetError(
                    f"the model needs {checked.memory_bytes} bytes of memory once loaded; the "
                    f"server's model memory budget is {self._budget} bytes"
                )
            self._check_tenant_memory(checked.memory_bytes, owner)

    def _reserve(self, owner: str, size: int, admit: Admit | None) -> None:
        """Takes one model and `size` bytes of the owner's quota and one slot of the store,
        atomically with the decision (see `add`); `_unreserve` gives them back."""
        with self._lock:
            if len(self._records) + sum(self._reserved.values()) >= self._max_models:
                raise self._full()
            if admit is not None:
                count, stored = self._usage_locked(owner)
                admit(count, stored, size)
            self._reserved[owner] += 1
            self._reserved_bytes[owner] += size

    def _unreserve(self, owner: str, size: int) -> None:
        with self._lock:
            self._reserved[owner] -= 1
            self._reserved_bytes[owner] -= size
            if self._reserved[owner] <= 0:
                del self._reserved[owner]
                self._reserved_bytes.pop(owner, None)

    def _usage_locked(self, owner: str) -> tuple[int, int]:
        owned = [r for r in self._records.values() if r.owner == owner]
        return (
            len(owned) + self._reserved[owner],
            sum(r.size for r in owned) + self._reserved_bytes[owner],
        )

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

    def check_room(
        self, name: str | None, owner: str, size: int = 0, admit: Admit | None = None
    ) -> None:
        """Refuses, before any bytes arrive, an upload that a full store (StoreFullError)
        or the owner's quota (`admit`, see `add`) could not take: then only re-sending a
        model under its own name can succeed. `add` decides again, atomically, with the
        bytes (other uploads may land meanwhile)."""
        self._follow_store()
        with self._lock:
            if name is not None and any(
                r.owner == owner and r.name == name for r in self._records.values()
            ):
                return
            if len(self._records) + sum(self._reserved.values()) >= self._max_models:
                raise self._full()
            if admit is not None:
                count, stored = self._usage_locked(owner)
                admit(count, stored, size)

    def _full(self) -> StoreFullError:
        return StoreFullError(
            f"the server holds its maximum of {self._max_models} models; delete one first"
        )

    def _forget_if_orphan(self, sha256: str) -> bool:
        """Drops the session of a hash no record uses any more (call with the lock held)."""
        if any(r.sha256 == sha256 for r in self._records.values()):
            return False
        self._signatures.pop(sha256, None)
        self._shapes.pop(sha256, None)
        self._cost.pop(sha256, None)
        if self._loaded.pop(sha256, None) is not None:
            self._pool.unload(sha256)
        return True

    def delete(self, record: ModelRecord) -> None:
        """Destroys the sealed copy, then forgets the record. Never waits for the model's
        worker: a run in progress finishes (its session is dropped right after), a run
        still queued ends in UnknownModelError."""
        # not `_lock`: the sealed store writes and fsyncs
        with self._write_lock, self._sealed.writing():
            self.sync_from_store()  # deleted by another replica: refused as unknown here
            if not self._stored(record):
                raise UnknownModelError(f"no model is known as {record.model_id!r}")
            # audited before it is committed: refused, with nothing deleted, if it cannot be
            self._sealed.delete(
                record.model_id,
                before_commit=lambda: self._audit(
                    "delete", tenant=record.owner, model_id=record.model_id, sha256=record.sha256
                ),
            )
            counter = self._sealed.counter
            with self._lock:
                self._records.pop(record.model_id, None)
                self._forget_if_orphan(record.sha256)  # its unload is queued, not awaited
                self._synced = counter

    def share(self, record: ModelRecord, tenants: Collection[str]) -> ModelRecord:
        shared = dataclasses.replace(record, shared_with=tuple(sorted(set(tenants))))
        # not `_lock`: the sealed store writes and fsyncs
        with self._write_lock, self._sealed.writing():
            self.sync_from_store()
            self._sealed.update_record(  # audited before it is committed, as delete
                shared,
                before_commit=lambda: self._audit(
                    "share",
                    tenant=record.owner,
                    model_id=record.model_id,
                    sha256=record.sha256,
                    detail={"tenants": ",".join(shared.shared_with)[:200]},
                ),
            )
            counter = self._sealed.counter
            with self._lock:
                self._records[record.model_id] = shared
                self._synced = counter
        return shared

    # -- replicas sharing the store (docs/operations.md, "Replicas sharing one store") ---

    def _follow_store(self) -> None:
        """Before a lookup: takes in other replicas' commits. One stat of the manifest
        when nothing changed (`SealedStore.poll`)."""
        if self._sealed.poll() != self._synced:
            self.sync_from_store()

    def sync_from_store(self) -> None:
        """Makes `_records` the store's view: models another replica added appear, models
        it deleted disappear (their loaded session, if no record uses it any more, is
        unloaded: a run of it ends in UnknownModelError), records it changed (sharing)
        are replaced. Never reads the store under `_lock` (the store's lock comes first:
        `_publish`); a view older than the one taken in already is ignored."""
        counter, stored = self._sealed.snapshot()
        with self._lock:
            if counter <= self._synced:
                return
            current = {r.model_id: r for r in stored}
            gone = [r for m, r in self._records.items() if m not in current]
            self._records.update(current)
            for record in gone:
                del self._records[record.model_id]
                self._forget_if_orphan(record.sha256)
            self._synced = counter

    def _recheck_room(self, owner: str, size: int, admit: Admit | None) -> None:
        """The owner's quota decided again at commit, once `sync_from_store` took in what
        other replicas committed: on committed models only (uploads in flight, here or
        elsewhere, are each decided at their own commit, one at a time under the store's
        writer lock), so that the quota holds across replicas. The store's model limit
        is `_existing`'s."""
        if admit is None:
            return
        with self._lock:
            owned = [r for r in self._records.values() if r.owner == owner]
        admit(len(owned), sum(r.size for r in owned), size)

    # -- execution -----------------------------------------------------------------------

    def run(
        self,
        record: ModelRecord,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        encoding: OutputEncoding | None = None,
    ) -> dict[str, np.ndarray]:
        """Loads the model if needed, runs it and waits for the outputs.

        `encoding`: which outputs the response carries as JSON (for its size limit).
        A model deleted before its run reached the worker ends in UnknownModelError."""
        _tensor_only(record)
        for _ in range(3):
            pending = self.loading(record)
            if pending is not None:
                pending.result()
            try:
                queued = self.submit(record, inputs, outputs, encoding=encoding)
                if queued is not None:
                    return queued.result()
            except ModelNotPlacedError:
                self._check_stored(record)  # else unloaded by an eviction: try again
        self._check_stored(record)
        raise self._contended()

    async def run_async(
        self,
        record: ModelRecord,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        encoding: OutputEncoding | None = None,
        tenant: str | None = None,
    ) -> dict[str, np.ndarray]:
        """`run` for the event loop: waiting for a load or for the model's worker holds
        no thread, so requests queued on one busy worker cannot starve anything else.
        `tenant`: the caller's, so that only its own runs may share a batch
        (WorkerPool.submit)."""
        _tensor_only(record)
        for _ in range(3):
            pending = self.loading(record)
            if pending is not None:
                await _wait(pending)
            try:
                queued = self._run_loaded(record, inputs, outputs, encoding, tenant)
                if queued is not None:
                    return await asyncio.shield(queued)  # cancelled: the pin lasts the run
            except ModelNotPlacedError:
                self._check_stored(record)
        self._check_stored(record)
        raise self._contended()

    def _run_loaded(
        self,
        record: ModelRecord,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        encoding: OutputEncoding | None,
        tenant: str | None = None,
    ) -> asyncio.Future[dict[str, np.ndarray]] | None:
        """`submit` for the loop: the run (WorkerPool.run_async: on the loop itself when
        the worker is idle) as a task that keeps the model from eviction until it ends,
        even if its caller stops waiting; None if the model is not loaded."""
        sha = record.sha256
        if not self._pin_loaded(sha):
            return None
        try:
            wanted = list(outputs) if outputs else None
            task = asyncio.ensure_future(
                self._pool.run_async(sha, dict(inputs), wanted, encoding=encoding, tenant=tenant)
            )
        except BaseException:
            self._unpin(sha)
            raise

        def ended(done: asyncio.Future[dict[str, np.ndarray]]) -> None:
            self._unpin(sha)
            if not done.cancelled():
                done.exception()  # retrieved: a caller that went away logs nothing

        task.add_done_callback(ended)
        return task

    async def generation_shape(self, record: ModelRecord) -> tuple[int, int]:
        """(context length, KV-cache bytes per token) of a generative model, as its worker
        read them at load: what a generation's KV reservation is sized by. Loads the model
        first where needed (the same shared load `generate_async` waits for)."""
        for _ in range(3):
            with self._lock:
                shape = self._shapes.get(record.sha256)
            if shape is not None:
                return shape
            pending = self.loading(record)
            if pending is not None:
                await _wait(pending)
        self._check_stored(record)
        raise self._contended()

    async def generate_async(
        self,
        record: ModelRecord,
        prompt: Mapping[str, object],
        params: SamplingParams,
        *,
        on_end: Callable[[GenerationOutcome], None] | None = None,
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Generates with a generative model on its worker: yields text pieces, then one
        `GenerationEnd`. Waiting for the load or the worker holds no thread; a consumer that
        stops iterating (its client went away) cancels the generation, which the worker
        notices between two tokens. `prompt`: {"messages": [...]} or {"text": ...}.

        `on_end` (quotas) is called once, from any thread, when the worker is done with
        the generation: with its `Usage` (a cancelled one's too), with the exception it
        ended in, or with None if it never reached a worker. The consumer may have stopped
        iterating long before: a cancel reaches the worker between two tokens."""
        if record.kind != "generative":
            raise GenerationRequestError(
                "not_generative", "this model is a tensor model: use /v2/models/{name}/infer"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()
        request = {"prompt": dict(prompt), "params": params.as_dict()}

        def emit(text: str | None) -> None:
            # the consumer's loop may be gone (it stopped iterating and ended): drop it
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, text)

        queued: Future[dict[str, object]] | None = None
        handed = False  # on_end given to the worker's future
        try:
            for _ in range(3):
                pending = self.loading(record)
                if pending is not None:
                    await _wait(pending)
                try:
                    queued = self._submit_generate(record, request, emit, cancel)
                except ModelNotPlacedError:
                    self._check_stored(record)
                    continue
                if queued is not None:
                    break
            if queued is None:
                self._check_stored(record)
                raise self._contended()
            queued.add_done_callback(lambda _: emit(None))
            if on_end is not None:
                ended = on_end
                queued.add_done_callback(lambda done: ended(_outcome(done)))
                handed = True
            while True:
                piece = await queue.get()
                if piece is None:
                    break
                yield piece
            final = await _wait(queued)
            yield GenerationEnd(
                finish_reason=str(final["finish_reason"]),
                usage=Usage(
                    prompt_tokens=int(final["prompt_tokens"]),  # type: ignore[call-overload]
                    completion_tokens=int(final["completion_tokens"]),  # type: ignore[call-overload]
                ),
                # checked by the pool (`workers._final`): lists of u32 ids
                prompt_token_ids=tuple(cast("list[int]", final["prompt_token_ids"])),
                output_token_ids=tuple(cast("list[int]", final["output_token_ids"])),
            )
        finally:
            cancel.set()  # a no-op once the generation has ended
            if on_end is not None and not handed:
                on_end(None)

    def _submit_generate(
        self,
        record: ModelRecord,
        request: Mapping[str, object],
        emit: Callable[[str], None],
        cancel: threading.Event,
    ) -> Future[dict[str, object]] | None:
        """`submit` for a generation: pinned against eviction while it runs."""
        sha = record.sha256
        if not self._pin_loaded(sha):
            return None
        try:
            queued = self._pool.submit_generate(sha, request, emit, cancel)
        except BaseException:
            self._unpin(sha)
            raise
        queued.add_done_callback(lambda _: self._unpin(sha))
        return queued

    def submit(
        self,
        record: ModelRecord,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        encoding: OutputEncoding | None = None,
    ) -> Future[dict[str, np.ndarray]] | None:
        """Queues a run of a loaded model on its worker, and keeps the model from being
        evicted until the run ends; None if the model is not loaded (see `loading`).
        Never blocks. The future may end in ModelNotPlacedError (unloaded meanwhile)."""
        _tensor_only(record)
        sha = record.sha256
        if not self._pin_loaded(sha):
            return None
        try:
            wanted = list(outputs) if outputs else None
            queued = self._pool.submit(sha, dict(inputs), wanted, encoding=encoding)
        except BaseException:
            self._unpin(sha)
            raise
        queued.add_done_callback(lambda _: self._unpin(sha))
        return queued

    def _pin_loaded(self, sha: str) -> bool:
        """Keeps a loaded model from eviction (until `_unpin`) and marks it recently used;
        False if it is not loaded."""
        with self._lock:
            if sha not in self._loaded:
                return False
            self._in_use[sha] += 1
            self._loaded.move_to_end(sha)
        return True

    def _unpin(self, sha: str) -> None:
        with self._lock:
            self._in_use[sha] -= 1
            if self._in_use[sha] <= 0:
                del self._in_use[sha]

    def _contended(self) -> OverloadedError:
        return OverloadedError(
            "the memory budget is contended: this model was evicted before it could run",
            retry_after_s=1.0,
        )

    def _stored(self, record: ModelRecord) -> bool:
        with self._lock:
            return record.model_id in self._records

    def _check_stored(self, record: ModelRecord) -> None:
        """UnknownModelError (the answer a new request would get) for a deleted model."""
        if not self._stored(record):
            raise UnknownModelError(unknown_model_message(record.model_id))

    def source(self, sha256: str) -> bytearray:
        """The sealed bytes of any model with this hash: how workers reload after a crash."""
        with self._lock:
            record = next((r for r in self._records.values() if r.sha256 == sha256), None)
        if record is None:
            raise UnknownModelError(f"no stored model has sha256 {sha256}")
        return self._sealed.get(record.model_id)

    def loading(self, record: ModelRecord) -> Future[None] | None:
        """None if the model is loaded; else the future of its load, started now on a
        loader thread unless one is already under way. Never blocks: one thread loads a
        model however many requests wait for it, and no lock is held while it does."""
        sha = record.sha256
        with self._lock:
            if record.model_id not in self._records:
                raise UnknownModelError(unknown_model_message(record.model_id))
            if sha in self._loaded:
                self._loaded.move_to_end(sha)
                return None
            pending = self._loading.get(sha)
            if pending is not None:
                return pending
            pending = Future()
            self._loading[sha] = pending
        try:
            self._loader.submit(self._load, record, pending)
        except RuntimeError:  # closed
            with self._lock:
                self._loading.pop(sha, None)
            pending.set_exception(RuntimeError("the model registry is closed"))
        return pending

    def _ensure_loaded(self, record: ModelRecord) -> None:
        pending = self.loading(record)
        if pending is not None:
            pending.result()

    def _load(self, record: ModelRecord, pending: Future[None]) -> None:
        """A loader thread's job: `_load_now`, its outcome handed to every waiter."""
        try:
            self._load_now(record)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(record.sha256, None)
            pending.set_exception(exc)
        else:
            pending.set_result(None)

    def _load_now(self, record: ModelRecord) -> None:
        sha = record.sha256
        with self._lock:
            if sha in self._loaded:
                self._loading.pop(sha, None)
                return
            # make room for what it cost last time (or twice its size) before loading
            if sha in self._cost:
                self._check_tenant_memory(self._cost[sha], record.owner)
            incoming = self._cost.get(sha, 2 * record.size)
            room = self._evict_for(incoming, keep=sha, owner=record.owner)
        self._flush_evicted()
        if not room:
            raise OverloadedError(
                "every loaded model is in use and the memory budget is full",
                retry_after_s=1.0,
            )
        loaded = self._pool_load(sha, self._sealed.get(record.model_id), record.kind, check=False)
        self._account(sha, loaded.memory_bytes, loaded.signature, owner=record.owner)
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

    def _flush_evicted(self) -> None:
        """Audits the evictions decided under the lock, once it is released (an audit
        entry is written and fsynced: never under the lock requests need)."""
        with self._lock:
            evicted, self._evicted = self._evicted, []
        for sha, freed in evicted:
            self._audit("evict", sha256=sha, detail={"memory_bytes": freed})

    def _account(
        self, sha256: str, cost: int, signature: ModelSignature, *, owner: str | None = None
    ) -> None:
        with self._lock:
            if cost > self._budget:
                self._pool.unload(sha256)
                raise MemoryBudgetError(
                    f"the model needs {cost} bytes of memory once loaded; the server's model "
                    f"memory budget is {self._budget} bytes"
                )
            if owner is not None:
                try:
                    self._check_tenant_memory(cost, owner)
                except TenantMemoryQuotaError:
                    self._pool.unload(sha256)
                    raise
                self._charged[sha256] = owner
            self._signatures[sha256] = signature
            self._cost[sha256] = cost
            self._loaded[sha256] = cost
            self._loaded.move_to_end(sha256)
            self._evict_for(0, keep=sha256, owner=owner)
        self._flush_evicted()

    def _check_tenant_memory(self, cost: int, owner: str) -> None:
        """Refuses a model whose measured cost alone exceeds its owner's memory quota."""
        limit = self._tenant_memory(owner)
        if limit is not None and cost > limit:
            raise TenantMemoryQuotaError(
                f"the model needs {cost} bytes of memory once loaded, more than the memory "
                "quota (max_loaded_bytes) of the tenant that owns it"
            )

    def loaded_by_tenant(self) -> dict[str, int]:
        """Bytes of loaded sessions charged to each tenant (see `_evict_for`)."""
        with self._lock:
            charged: Counter[str] = Counter()
            for sha, cost in self._loaded.items():
                charged[self._charged.get(sha, "")] += cost
            return dict(charged)

    def _charged_to(self, tenant: str) -> int:
        return sum(cost for sha, cost in self._loaded.items() if self._charged.get(sha) == tenant)

    def _evict_for(self, incoming: int, *, keep: str, owner: str | None = None) -> bool:
        """Evicts least recently used idle sessions until `incoming` more bytes fit the
        budget; False if the models in use leave no room.

        With `owner` (the tenant the incoming session is charged to) and a memory quota
        for it, the owner's own sessions go first, until the incoming bytes fit its
        quota: a tenant makes room in its own share, never by pushing out the others'
        models. Only when the quotas together exceed the budget (an operator's choice)
        can the budget itself still evict another tenant's least recently used model.
        """
        limit = None if owner is None else self._tenant_memory(owner)
        # an estimate above the whole quota still gets its try: `_account` decides on the
        # measured cost (it refuses a model that alone exceeds the quota)
        while limit is not None and self._charged_to(owner or "") + min(incoming, limit) > limit:
            victim = next(
                (
                    s
                    for s in self._loaded
                    if s != keep and s not in self._in_use and self._charged.get(s) == owner
                ),
                None,
            )
            if victim is None:
                return False
            freed = self._loaded.pop(victim)
            self._pool.unload(victim)
            self._evicted.append((victim, freed))  # audited by _flush_evicted
        while sum(self._loaded.values()) + incoming > self._budget:
            victim = next((s for s in self._loaded if s != keep and s not in self._in_use), None)
            if victim is None:
                return False
            freed = self._loaded.pop(victim)
            self._pool.unload(victim)
            self._evicted.append((victim, freed))  # audited by _flush_evicted
        return True
