"""The `simulation` argument: only True or False (a truthy string must never trust the
simulation root), and the SimulationWarning on EVERY call that accepts simulation, not once
per call site as Python's default warning filter would show it.

No server is needed: both checks happen before the client connects, so each call goes to a
closed port and ends in ConnectionFailedError after it has (or has not) warned."""

from __future__ import annotations

import asyncio
import socket
import warnings
from typing import Any

import pytest

import blindinfer
from blindinfer.client.client import verify_bundle
from blindinfer.client.simulation import SIMULATION_BANNER

POLICY = {"sgx": {"mrenclave": "11" * 32}}
NOT_BOOLS = ["false", "False", "0", "no", "", "true", [0], [], (), 0, 1, None, 0.0, b"0"]


@pytest.fixture(scope="module")
def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"https://127.0.0.1:{port}"


@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
def test_connect_refuses_a_non_bool_simulation(closed_url: str, value: Any) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(blindinfer.UsageError, match="simulation must be True or False") as e:
            blindinfer.connect(closed_url, policy=POLICY, simulation=value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, blindinfer.BlindInferError)
    assert not caught  # refused before anything trusted (or warned about) the simulation root


@pytest.mark.parametrize("value", ["false", "0", "no", [0], 1], ids=repr)
def test_every_entry_point_refuses_a_non_bool_simulation(closed_url: str, value: Any) -> None:
    with pytest.raises(blindinfer.UsageError, match="simulation must be True or False"):
        blindinfer.attest(closed_url, policy=None, simulation=value)
    with pytest.raises(blindinfer.UsageError, match="simulation must be True or False"):
        asyncio.run(blindinfer.connect_async(closed_url, policy=POLICY, simulation=value))

    async def via_class() -> None:
        await blindinfer.AsyncClient.connect(closed_url, policy=POLICY, simulation=value)

    with pytest.raises(blindinfer.UsageError, match="simulation must be True or False"):
        asyncio.run(via_class())
    with pytest.raises(blindinfer.UsageError, match="simulation must be True or False"):
        verify_bundle(object(), policy=None, simulation=value)  # type: ignore[arg-type]


def _connect_twice(url: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: once per call site
        for _ in range(2):
            with pytest.raises(blindinfer.ConnectionFailedError):
                blindinfer.connect(url, policy=POLICY, simulation=True)
    return [w for w in caught if issubclass(w.category, blindinfer.SimulationWarning)]


def test_the_simulation_warning_shows_on_every_call(closed_url: str) -> None:
    shown = _connect_twice(closed_url)
    assert [str(w.message) for w in shown] == [SIMULATION_BANNER] * 2
    assert {w.filename for w in shown} == {__file__}  # names the caller's line
    # A third batch from the same line still shows: no registry remembers the call site.
    assert len(_connect_twice(closed_url)) == 2


def test_the_simulation_warning_shows_on_every_async_call(closed_url: str) -> None:
    async def twice() -> None:
        for _ in range(2):
            with pytest.raises(blindinfer.ConnectionFailedError):
                await blindinfer.connect_async(closed_url, policy=POLICY, simulation=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        asyncio.run(twice())
    shown = [w for w in caught if issubclass(w.category, blindinfer.SimulationWarning)]
    assert len(shown) == 2 and {w.filename for w in shown} == {__file__}


def test_attest_warns_every_time_too(closed_url: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(2):
            with pytest.raises(blindinfer.ConnectionFailedError):
                blindinfer.attest(closed_url, policy=None, simulation=True)
    shown = [w for w in caught if issubclass(w.category, blindinfer.SimulationWarning)]
    assert len(shown) == 2 and {w.filename for w in shown} == {__file__}


def test_a_caller_can_still_silence_it_on_purpose(closed_url: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        with pytest.raises(blindinfer.ConnectionFailedError):
            blindinfer.connect(closed_url, policy=POLICY, simulation=True)
    assert not [w for w in caught if issubclass(w.category, blindinfer.SimulationWarning)]
