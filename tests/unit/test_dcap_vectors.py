"""verify_dcap against real Intel evidence that this project did not make: every
intel-dcap case of the shared manifest reaches exactly its expected outcome."""

from __future__ import annotations

from typing import Any

import pytest

from blindinfer.attestation.intel.dcap import verify_dcap
from blindinfer.attestation.roots import INTEL_SGX_ROOT
from blindinfer.errors import QuoteVerificationError
from support import vectors
from support.vectors import VECTORS


def _cases() -> list[Any]:
    return vectors.case_params("intel-dcap")


def _evidence(case: dict[str, Any]) -> bytes:
    raw = (VECTORS / str(case["evidence"])).read_bytes()
    if case["evidence_encoding"] == "hex":
        return bytes.fromhex(raw.decode("ascii").strip())
    assert case["evidence_encoding"] == "binary"
    return raw


def test_manifest_has_the_expected_intel_cases() -> None:
    ids = set(vectors.case_ids("intel-dcap"))
    assert {"sgx_v3_phala_processor", "neg_sgx_debug_occlum", "neg_expired_collateral"} <= ids


@pytest.mark.parametrize("case", _cases())
def test_intel_dcap_vector(case: dict[str, Any]) -> None:
    quote = _evidence(case)
    collateral = (VECTORS / str(case["collateral"])).read_text()
    if case["expect"] == "ok":
        verdict = verify_dcap(quote, collateral, root=INTEL_SGX_ROOT, now=case["verify_at_unix"])
        assert verdict.status == case["tcb_status"]
        assert verdict.advisory_ids == tuple(case["advisory_ids"])
    else:
        assert case["expect"] == "err"
        with pytest.raises(QuoteVerificationError) as info:
            verify_dcap(quote, collateral, root=INTEL_SGX_ROOT, now=case["verify_at_unix"])
        assert case["error_mentions"].lower() in str(info.value).lower()
