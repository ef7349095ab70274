"""Assemble SGX DCAP v3 quotes the way Intel's quoting enclave would, in software.

The byte layout is not repeated here: quotes are built from the client's own dataclasses
(`blindinfer.attestation.intel.sgx_quote`) and serialised by their `to_bytes`, so the builder
and the parser share one table per structure.

Per platform instance, a fresh attestation key is certified by a simulated QE report
(report_data[0:32] = SHA-256(attestation key || QE auth data), signed by the PCK leaf
key); per quote, only the header + enclave report body is signed, which keeps
`build()` cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from blindinfer.attestation.intel.sgx_quote import (
    ATT_KEY_TYPE_ECDSA_P256,
    CERT_DATA_TYPE_PCK_CHAIN,
    QUOTE_VERSION_SGX,
    TEE_TYPE_SGX,
    QuoteHeader,
    QuoteSignatureData,
    SgxQuote,
    SgxReportBody,
)
from blindinfer.tee.simulation import pki as sim_pki

INTEL_QE_VENDOR_ID: Final = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
"""dcap-qvl refuses other vendors, so the simulated QE claims Intel's id."""

SIMULATION_USER_DATA: Final = b"blindinfer SIMULATION"[:20].ljust(20, b"\x00")
"""The header's free user_data field, marking simulation quotes for human readers."""


class QuoteBuilder:
    """Signs enclave report bodies into complete v3 quotes for one simulated platform."""

    def __init__(self, pki: sim_pki.SimulationPki) -> None:
        self._attestation_key = ec.generate_private_key(ec.SECP256R1())
        attestation_key = sim_pki.raw_public_key(self._attestation_key.public_key())
        qe_auth_data = hashlib.sha256(b"blindinfer SIMULATION QE auth data").digest()
        qe_report = SgxReportBody(
            cpusvn=sim_pki.SIM_CPUSVN,
            miscselect=0,
            attributes=sim_pki.SIM_QE_ATTRIBUTES,
            mrenclave=sim_pki.SIM_QE_MRENCLAVE,
            mrsigner=sim_pki.SIM_QE_MRSIGNER,
            config_id=bytes(64),
            isvprodid=sim_pki.SIM_QE_ISVPRODID,
            isvsvn=sim_pki.SIM_QE_ISVSVN,
            config_svn=0,
            isv_family_id=bytes(16),
            report_data=hashlib.sha256(attestation_key + qe_auth_data).digest() + bytes(32),
        )
        self._header = QuoteHeader(
            version=QUOTE_VERSION_SGX,
            att_key_type=ATT_KEY_TYPE_ECDSA_P256,
            tee_type=TEE_TYPE_SGX,
            qe_svn=sim_pki.SIM_QE_ISVSVN,
            pce_svn=sim_pki.SIM_PCESVN,
            qe_vendor_id=INTEL_QE_VENDOR_ID,
            user_data=SIMULATION_USER_DATA,
        )
        self._header_bytes = self._header.to_bytes()
        # Everything but the per-quote signature; `build` swaps that one field in.
        self._unsigned = QuoteSignatureData(
            signature=bytes(64),
            attestation_key=attestation_key,
            qe_report=qe_report,
            qe_report_signature=sim_pki.raw_signature(pki.pck_leaf_key, qe_report.to_bytes()),
            qe_auth_data=qe_auth_data,
            cert_data_type=CERT_DATA_TYPE_PCK_CHAIN,
            cert_data=pki.pck_chain_pem,
        )

    def build(self, body: SgxReportBody) -> SgxQuote:
        """A quote over `body`, signed by this platform's attestation key."""
        signature = sim_pki.raw_signature(
            self._attestation_key, self._header_bytes + body.to_bytes()
        )
        sig_data = dataclasses.replace(self._unsigned, signature=signature)
        return SgxQuote.assemble(self._header, body, sig_data)
