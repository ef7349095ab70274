"""`SimulationPlatform`: the `Platform` the server uses when no real TEE is present.

INSECURE BY DESIGN. Its evidence has the exact shape of SGX DCAP evidence (a v3 quote
plus dcap-qvl collateral) and verifies with the unmodified dcap-qvl verifier, but it
chains to the simulation root, whose private keys ship with this package: anyone can
forge it, and its sealing key is derivable by anyone who knows the measurements. It
exists so that the whole attestation path is exercised in development and tests; the
client refuses it unless explicitly told to accept simulation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindinfer.attestation.intel.sgx_quote import (
    ATTR_FLAG_DEBUG,
    ATTR_FLAG_INIT,
    ATTR_FLAG_MODE64BIT,
    SgxReportBody,
)
from blindinfer.tee.platform import REPORT_DATA_SIZE, Evidence
from blindinfer.tee.simulation import pki as sim_pki
from blindinfer.tee.simulation.quote_builder import QuoteBuilder

SIMULATION_MRSIGNER: Final = hashlib.sha256(
    sim_pki.raw_public_key(sim_pki.load_key("enclave_signer").public_key())
).digest()
"""MRSIGNER of simulated enclaves: SHA-256 of the shipped signer's public key (x || y)."""

SIMULATION_SEALING_SECRET: Final = b"blindinfer SIMULATION sealing secret: public, NOT secret"
"""Stands in for the CPU's sealing fuse key. It is public, so sealed data is not protected."""

SIMULATION_XFRM: Final = 0x03  # x87 | SSE
COLLATERAL_REFRESH_MARGIN: Final = 86400
"""Collateral is rebuilt once it has less than a day left before its nextUpdate."""


class SimulationPlatform:
    """A simulated SGX enclave with measurement `mrenclave` (insecure, see module doc)."""

    def __init__(
        self,
        mrenclave: bytes,
        *,
        isvprodid: int = 1,
        isvsvn: int = 1,
        debug: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(mrenclave, bytes) or len(mrenclave) != 32:
            raise ValueError("mrenclave must be 32 bytes")
        flags = ATTR_FLAG_INIT | ATTR_FLAG_MODE64BIT | (ATTR_FLAG_DEBUG if debug else 0)
        # Validates isvprodid/isvsvn ranges; evidence() only swaps report_data in.
        self._template = SgxReportBody(
            cpusvn=sim_pki.SIM_CPUSVN,
            miscselect=0,
            attributes=flags.to_bytes(8, "little") + SIMULATION_XFRM.to_bytes(8, "little"),
            mrenclave=mrenclave,
            mrsigner=SIMULATION_MRSIGNER,
            config_id=bytes(64),
            isvprodid=isvprodid,
            isvsvn=isvsvn,
            config_svn=0,
            isv_family_id=bytes(16),
            report_data=bytes(REPORT_DATA_SIZE),
        )
        self._clock = clock
        self._pki = sim_pki.simulation_pki()
        self._builder = QuoteBuilder(self._pki)
        self._lock = threading.Lock()
        self._collateral: sim_pki.Collateral | None = None

    @property
    def kind(self) -> str:
        return "simulation"

    @property
    def mrenclave(self) -> bytes:
        return self._template.mrenclave

    @property
    def mrsigner(self) -> bytes:
        return self._template.mrsigner

    def evidence(self, report_data: bytes) -> Evidence:
        """A fresh quote over `report_data` (exactly 64 bytes) with cached collateral."""
        if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
        quote = self._builder.build(dataclasses.replace(self._template, report_data=report_data))
        return Evidence(kind="intel-sgx", quote=quote.raw, collateral_json=self._current_json())

    def sealing_key(self) -> bytes:
        """HKDF-SHA256(public secret, info = "blindinfer-seal" || MRENCLAVE || MRSIGNER).

        Deterministic per enclave identity, like SGX's MRENCLAVE-bound sealing, but the
        input secret is public: anyone can derive this key. Never seal real secrets with it.
        """
        info = b"blindinfer-seal" + self._template.mrenclave + self._template.mrsigner
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info)
        return hkdf.derive(SIMULATION_SEALING_SECRET)

    def _current_json(self) -> str:
        """The cached collateral, rebuilt near its nextUpdate or if the clock moved back."""
        now = int(self._clock())
        with self._lock:
            c = self._collateral
            if c is None or now < c.issue_date or now > c.next_update - COLLATERAL_REFRESH_MARGIN:
                c = self._collateral = self._pki.collateral(now)
            return c.json
