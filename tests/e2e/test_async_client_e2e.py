"""The AsyncClient against real simulation servers: it verifies exactly as `connect()` does,
runs models bit-identically to onnxruntime in-process (also many at once), reports upload
progress; and both clients ride out a tenant's rate limit by retrying 429s."""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import blindinfer
from blindinfer.cli.progress import upload_with_progress
from blindinfer.client.async_client import AsyncClient, connect_async
from blindinfer.client.retry import NO_RETRY, RetryPolicy
from blindinfer.server.auth import generate_api_key
from blindinfer.server.config import ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support import onnx_models as zoo

from .conftest import policy_for
from .test_inference_e2e import assert_bit_identical, in_process

pytestmark = pytest.mark.e2e


def _quietly_connect(url: str, policy: blindinfer.Policy, **options: object) -> AsyncClient:
    async def go() -> AsyncClient:
        return await connect_async(url, policy=policy, simulation=True, **options)  # type: ignore[arg-type]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return asyncio.run(go())


def test_async_connect_verifies_like_connect(
    server: ServerProcess, policy: blindinfer.Policy
) -> None:
    async def scenario() -> None:
        with pytest.raises(blindinfer.SimulationNotAllowedError):
            await connect_async(server.url, policy=policy)
        wrong = policy_for(ServerConfig(simulation=True, isvsvn=2))
        with (
            pytest.warns(blindinfer.SimulationWarning),
            pytest.raises(blindinfer.PolicyMismatchError) as mismatch,
        ):
            await connect_async(server.url, policy=wrong, simulation=True)
        assert "mrenclave" in str(mismatch.value)

        with pytest.warns(blindinfer.SimulationWarning, match="SIMULATION MODE"):
            client = await connect_async(server.url, policy=policy, simulation=True)
        async with client:
            assert client.attestation.simulation
            assert isinstance(await client.list_models(), list)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", blindinfer.SimulationWarning)
            async with AsyncClient.connect(server.url, policy=policy, simulation=True) as other:
                assert other.attestation.certificate_der == client.attestation.certificate_der
                assert isinstance(await other.list_models(), list)
            awaited = await AsyncClient.connect(server.url, policy=policy, simulation=True)
            await awaited.close()
            await (await connect_async(server.url, policy=policy, simulation=True)).close()
        # each form warns once, pointing at the caller's line
        assert [w.category for w in caught] == [blindinfer.SimulationWarning] * 3
        assert {w.filename for w in caught} == {__file__}

    asyncio.run(scenario())


def test_async_upload_run_delete_bit_identical(
    server: ServerProcess, policy: blindinfer.Policy, tmp_path: Path
) -> None:
    model = zoo.model_bytes(zoo.multi_io_model())
    path = tmp_path / "multi.onnx"
    path.write_bytes(model)

    async def scenario() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = await connect_async(server.url, policy=policy, simulation=True)
        async with client:
            info = await client.upload_model(path, name="async-multi-io")
            assert info.size == len(model)
            try:
                for batch in (1, 5):
                    feed = zoo.multi_io_feed(batch=batch, seed=batch)
                    got = await client.run_model("async-multi-io", feed)
                    assert_bit_identical(got, in_process(model, feed))
                metadata = await client.model_metadata(info.model_id)
                assert [i.name for i in metadata.inputs] == list(zoo.multi_io_feed())
            finally:
                deleted = await client.delete_model(info.model_id)
            assert deleted.model_id == info.model_id
            assert info.model_id not in {m.model_id for m in await client.list_models()}
            with pytest.raises(blindinfer.ServerError) as gone:
                await client.run_model(info.model_id, zoo.multi_io_feed())
            assert (gone.value.status, gone.value.code) == (404, "unknown_model")

    asyncio.run(scenario())


def test_concurrent_runs_with_gather(server: ServerProcess, policy: blindinfer.Policy) -> None:
    model = zoo.model_bytes(zoo.mlp_model(seed=21))
    rng = np.random.default_rng(21)
    feeds = [rng.standard_normal((1 + i % 4, 64)).astype(np.float32) for i in range(48)]

    async def scenario() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = await connect_async(
                server.url, policy=policy, simulation=True, max_connections=8
            )
        async with client:
            info = await client.upload_model(model, name="async-mlp")
            try:
                # a bare array: the one input's name comes from the (cached) metadata
                results = await asyncio.gather(*(client.run_model(info.model_id, x) for x in feeds))
            finally:
                await client.delete_model(info.model_id)
        for x, got in zip(feeds, results, strict=True):
            assert_bit_identical(got, in_process(model, {"x": x}))

    asyncio.run(scenario())


def test_upload_progress_increases_to_the_file_size(
    server: ServerProcess,
    policy: blindinfer.Policy,
    client: blindinfer.Client,
    tmp_path: Path,
) -> None:
    model = zoo.model_bytes(zoo.mlp_model(in_features=1024, hidden=768, seed=5))
    assert len(model) > 3 << 20  # several chunks
    path = tmp_path / "big.onnx"
    path.write_bytes(model)
    seen: list[tuple[int, int | None]] = []

    async def scenario() -> blindinfer.ModelInfo:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            connected = await connect_async(server.url, policy=policy, simulation=True)
        async with connected:
            info = await connected.upload_model(
                path, name="async-big", progress=lambda done, total: seen.append((done, total))
            )
            await connected.delete_model(info.model_id)
            return info

    info = asyncio.run(scenario())
    assert info.size == len(model)
    counts = [done for done, _ in seen]
    assert counts[0] == 0 and counts[-1] == len(model)
    assert counts == sorted(set(counts)) and len(counts) >= 4
    assert {total for _, total in seen} == {len(model)}

    # the sync client and the CLI's bar: same counts, a bar on stderr ending at 100%
    sync_seen: list[int] = []
    again = client.upload_model(path, progress=lambda done, total: sync_seen.append(done))
    assert sync_seen == counts
    err = io.StringIO()
    shown = upload_with_progress(client, path, "cli-big", stream=err)
    assert shown.sha256 == again.sha256 == info.sha256
    assert err.getvalue().splitlines()[-1].startswith("uploading big.onnx [" + "#" * 30 + "] 100%")
    client.delete_model(shown.model_id)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """A server whose only tenant may send 2 requests per second, 2 at once."""
    key, sha = generate_api_key()
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    path.write_text(
        '[[tenant]]\nname = "slow"\nmax_models = 4\nrequests_per_second = 2\nburst = 2\n'
        f'[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = "{sha}"\n'
    )
    with start_server(["--simulation", f"--auth-file={path}"]) as server:
        yield server, key


def test_rate_limited_requests_are_retried_until_they_succeed(
    limited: tuple[ServerProcess, str], caplog: pytest.LogCaptureFixture
) -> None:
    server, key = limited
    policy = policy_for(ServerConfig(simulation=True))
    model = zoo.model_bytes(zoo.mlp_model(seed=31))
    feed = {"x": np.ones((2, 64), np.float32)}
    want = in_process(model, feed)
    patient = RetryPolicy(max_attempts=10)

    async def scenario() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            impatient = await connect_async(
                server.url, policy=policy, simulation=True, api_key=key, retry=NO_RETRY
            )
            client = await connect_async(
                server.url, policy=policy, simulation=True, api_key=key, retry=patient
            )
        async with impatient, client:
            # without retries a burst over the limit is refused with 429 and Retry-After
            answers = await asyncio.gather(
                *(impatient.list_models() for _ in range(6)), return_exceptions=True
            )
            refused = [a for a in answers if isinstance(a, blindinfer.ServerError)]
            assert refused and all((e.status, e.code) == (429, "rate_limited") for e in refused)

            # with them, every request of a burst succeeds, uploads included
            info = await client.upload_model(model, name="limited")
            results = await asyncio.gather(*(client.run_model("limited", feed) for _ in range(6)))
            for got in results:
                assert_bit_identical(got, want)
            await client.delete_model(info.model_id)

    with caplog.at_level(logging.INFO, logger="blindinfer.client"):
        asyncio.run(scenario())
        retried = [r for r in caplog.records if "retrying" in r.getMessage()]
        assert retried and all(r.getMessage().startswith("HTTP 429") for r in retried)

        # the sync Client retries the same way
        caplog.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            sync = blindinfer.connect(
                server.url, policy=policy, simulation=True, api_key=key, retry=patient
            )
        with sync:
            counts = [len(sync.list_models()) for _ in range(5)]
        assert counts == [0] * 5
        assert any("retrying" in r.getMessage() for r in caplog.records)
