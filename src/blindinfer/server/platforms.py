"""Choosing the TEE platform at start-up. Without hardware the server refuses to start
unless simulation was asked for explicitly."""

from __future__ import annotations

import logging

from blindinfer.errors import BlindInferError
from blindinfer.server.config import ServerConfig
from blindinfer.tee.measurement import measure
from blindinfer.tee.platform import Platform

log = logging.getLogger("blindinfer.server")


class NoPlatformError(BlindInferError):
    """No TEE is available and simulation was not requested."""


def simulated_mrenclave(config: ServerConfig) -> bytes:
    return measure(config.security_relevant())


def select_platform(config: ServerConfig) -> Platform:
    if not config.simulation:
        raise NoPlatformError(
            "no TEE platform is available to this server (no Gramine /dev/attestation, no "
            "/sys/kernel/config/tsm/report); start it with --simulation to run without "
            "confidentiality guarantees"
        )
    from blindinfer.tee.simulation.platform import SimulationPlatform

    log.warning(
        "SIMULATION MODE: this server runs outside any TEE. Its evidence is signed by the "
        "blindinfer simulation root, which anyone can use: it proves nothing about this machine."
    )
    return SimulationPlatform(
        simulated_mrenclave(config),
        isvprodid=config.isvprodid,
        isvsvn=config.isvsvn,
        debug=config.simulate_debug_enclave,
    )
