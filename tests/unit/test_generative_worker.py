"""The worker pool's generative ops: load an archive, stream a generation, cancel it.

Real worker processes and the real tiny Llama (tests/support/tiny_llm.py); the in-process
GenerativeSession on the same folder is the reference for exactness.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from blindinfer.client.model_folder import ModelFolder
from blindinfer.protocol.generation import SamplingParams
from blindinfer.runtime.errors import GenerationRequestError
from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions
from blindinfer.runtime.workers import WorkerPool

MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def archive(tiny_llm: tuple[Path, Path]) -> bytes:
    return b"".join(ModelFolder.open(tiny_llm[1]).chunks())


@pytest.fixture(scope="module")
def pool(archive: bytes) -> WorkerPool:
    pool = WorkerPool(
        workers=1,
        memory_limit_bytes=4 << 30,
        timeout_s=60,
        source=lambda key: archive,
        intra_op_threads=1,
        max_new_tokens=64,
    )
    yield pool  # type: ignore[misc]
    pool.close()


def _generate(
    pool: WorkerPool, params: SamplingParams, cancel: threading.Event | None = None
) -> tuple[list[str], dict[str, object]]:
    pieces: list[str] = []
    final = pool.submit_generate(
        "m",
        {"prompt": {"messages": MESSAGES}, "params": params.as_dict()},
        pieces.append,
        cancel or threading.Event(),
    ).result()
    return pieces, final


def test_load_replies_a_generative_signature(pool: WorkerPool, archive: bytes) -> None:
    loaded = pool.validate_and_load("m", archive, "generative")
    assert loaded.kind == "generative"
    assert loaded.context_length is not None and loaded.context_length > 0
    assert loaded.vocab_size is not None and loaded.vocab_size > 0
    assert loaded.signature.inputs == () and loaded.memory_bytes >= 0


def test_greedy_generation_equals_in_process(pool: WorkerPool, tiny_llm: tuple[Path, Path]) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0)
    pieces, final = _generate(pool, params)
    session = GenerativeSession(tiny_llm[1], RuntimeOptions(intra_op_threads=1))
    ids = session.chat_prompt_ids(MESSAGES)
    with session.generate(ids, params) as generation:
        tokens = list(generation)
    expected = [t.text for t in tokens]
    assert "".join(pieces) == "".join(expected)
    assert final["completion_tokens"] == generation.completion_tokens
    assert final["prompt_tokens"] == len(ids)
    # the final frame carries the ids a receipt signs: every generated token, stop included
    assert final["prompt_token_ids"] == ids
    assert final["output_token_ids"] == [t.token_id for t in tokens]
    assert final["finish_reason"] == generation.finish_reason


def test_cancel_stops_the_generation(pool: WorkerPool) -> None:
    cancel = threading.Event()
    pieces: list[str] = []

    def emit(text: str) -> None:
        pieces.append(text)
        cancel.set()  # the consumer goes away after the first piece

    params = SamplingParams(max_tokens=64, temperature=0.0, stop=())
    request = {"prompt": {"messages": MESSAGES}, "params": params.as_dict()}
    final = pool.submit_generate("m", request, emit, cancel).result()
    assert final["finish_reason"] == "cancelled"
    assert isinstance(final["completion_tokens"], int) and final["completion_tokens"] < 64
    # the worker is in step and free: the next generation runs normally
    _, again = _generate(pool, SamplingParams(max_tokens=4, temperature=0.0))
    assert again["finish_reason"] in ("stop", "length")


def test_a_request_over_the_server_limit_is_refused(pool: WorkerPool) -> None:
    with pytest.raises(GenerationRequestError) as caught:
        _generate(pool, SamplingParams(max_tokens=65, temperature=0.0))
    assert caught.value.code == "invalid_max_tokens"


def test_registry_keeps_the_kind_and_streams_through_the_queue(
    archive: bytes, tmp_path: Path
) -> None:
    """A generative record survives a restart with its kind; `generate_async` yields text
    then the end; a consumer that stops early cancels, and the worker serves on."""
    import asyncio
    import hashlib
    import secrets

    from blindinfer.store.registry import GenerationEnd, ModelRegistry
    from blindinfer.store.sealed import SealedStore

    key = secrets.token_bytes(32)
    box: list[ModelRegistry] = []
    with WorkerPool(
        workers=1,
        memory_limit_bytes=4 << 30,
        timeout_s=60,
        intra_op_threads=1,
        source=lambda sha: box[-1].source(sha),
        max_new_tokens=64,
    ) as pool:
        registry = ModelRegistry(
            sealed=SealedStore(tmp_path, key, max_bytes=1 << 30),
            pool=pool,
            memory_budget=2 << 30,
            max_models=4,
        )
        box.append(registry)
        sha = hashlib.sha256(archive).hexdigest()
        record, created = registry.add(archive, sha, name="tiny", owner="t", kind="generative")
        assert created and record.kind == "generative"
        params = SamplingParams(max_tokens=16, temperature=0.0)
        prompt = {"messages": MESSAGES}

        async def whole() -> tuple[str, GenerationEnd]:
            pieces: list[str] = []
            async for event in registry.generate_async(record, prompt, params):
                if isinstance(event, GenerationEnd):
                    return "".join(pieces), event
                pieces.append(event)
            raise AssertionError("no end")

        async def abandon() -> None:
            events = registry.generate_async(record, prompt, params)
            assert isinstance(await anext(events), str)
            await events.aclose()

        text, end = asyncio.run(whole())
        assert end.finish_reason in ("stop", "length") and end.usage.completion_tokens <= 16
        asyncio.run(abandon())
        assert asyncio.run(whole())[0] == text  # the worker is in step after a cancel
        registry.close()
    again = SealedStore(tmp_path, key, max_bytes=1 << 30)
    assert [r.kind for r in again.records()] == ["generative"]


def test_records_from_before_kinds_read_as_tensor_models() -> None:
    import json

    from blindinfer.store.sealed import SealedDataError, _record_from_json

    body = {
        "model_id": "m-" + "0" * 32,
        "name": "old",
        "sha256": "0" * 64,
        "owner": "t",
        "size": 1,
        "created_at": 0.0,
        "shared_with": [],
        "counter": 1,
    }
    record, _ = _record_from_json(json.dumps(body).encode())
    assert record.kind == "tensor"
    with pytest.raises(SealedDataError):
        _record_from_json(json.dumps(body | {"kind": "script"}).encode())
