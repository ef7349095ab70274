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


PLATFORMS = ("auto", "simulation", "gramine-sgx", "tdx", "snp", "coco-tdx", "coco-snp")


def select_platform(config: ServerConfig) -> Platform:
    choice = config.platform_choice
    if choice == "auto":
        from blindinfer.tee.detect import describe_missing, detect_platform

        choice = detect_platform() or ""
        if not choice:
            raise NoPlatformError(
                describe_missing() + "; start with --simulation to run without "
                "confidentiality guarantees"
            )
    if choice == "simulation":
        return _simulation(config)
    return _hardware(choice, config)


def _simulation(config: ServerConfig) -> Platform:
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


def _hardware(choice: str, config: ServerConfig) -> Platform:
    from blindinfer.attestation.intel.pccs import CollateralError, PccsCollateral
    from blindinfer.tee import coco_agent
    from blindinfer.tee.configfs_tsm import ConfigfsTsmPlatform, KdsVcekSource, TsmError
    from blindinfer.tee.gramine import GramineError, GramineSgxPlatform

    if config.simulate_debug_enclave:
        raise NoPlatformError("--simulate-debug-enclave only exists in simulation")
    insecure = config.insecure_http_collateral
    try:
        pccs = (
            PccsCollateral(config.pccs_url, allow_insecure_http=insecure)
            if config.pccs_url
            else None
        )
        if choice == "gramine-sgx":
            if pccs is None:
                raise NoPlatformError("gramine-sgx needs --pccs-url for DCAP collateral")
            return GramineSgxPlatform(collateral=pccs)
        kds = (
            KdsVcekSource(config.kds_url, product=config.snp_product, allow_insecure_http=insecure)
            if config.kds_url
            else None
        )
        tee = coco_agent.PLATFORMS.get(choice)
        if tee is not None:
            if config.snp_vmpl not in (None, 0):
                raise NoPlatformError(
                    "--snp-vmpl does not apply to --platform coco-snp: the Attestation Agent "
                    "asks for VMPL 0 reports"
                )
            agent = coco_agent.CocoAgentPlatform(
                tee, aa_url=config.aa_url, collateral=pccs, vcek_source=kds, crl_source=kds
            )
            log.info("evidence from the Attestation Agent at %s (%s)", agent.aa_url, choice)
            _warn_without_crl(agent.kind, kds)
            return agent
        platform = ConfigfsTsmPlatform(
            collateral=pccs, vcek_source=kds, crl_source=kds, privlevel=config.snp_vmpl
        )
    except (GramineError, TsmError, CollateralError, ValueError) as exc:
        raise NoPlatformError(str(exc)) from exc
    if platform.kind != choice:
        raise NoPlatformError(
            f"--platform {choice}, but configfs-tsm's provider is {platform.provider!r}"
        )
    _warn_without_crl(platform.kind, kds)
    return platform


def _warn_without_crl(kind: str, kds: object) -> None:
    if kind == "snp" and kds is None:
        log.warning(
            "SEV-SNP without --kds-url: the evidence carries no AMD CRL, so clients refuse it "
            "unless their policy sets [snp] allow_missing_crl = true"
        )
