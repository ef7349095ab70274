"""The public surface of `blindinfer`, and the rule that the client never imports the server."""

from __future__ import annotations

import json
import subprocess
import sys

import blindinfer

SERVER_SIDE = ("blindinfer.server", "blindinfer.tee", "blindinfer.store", "blindinfer.runtime")
SERVER_LIBRARIES = ("onnxruntime", "onnx", "starlette", "uvicorn")


def test_exported_names() -> None:
    assert sorted(blindinfer.__all__) == [
        "AsyncClient",
        "AttestationError",
        "BlindInferError",
        "Client",
        "ConnectionFailedError",
        "DebugEnclaveError",
        "FreshnessError",
        "KeyBindingError",
        "MaskedValue",
        "Mismatch",
        "ModelInfo",
        "ModelMetadata",
        "NO_RETRY",
        "Policy",
        "PolicyError",
        "PolicyMismatchError",
        "ProtocolError",
        "QuoteParseError",
        "QuoteVerificationError",
        "RetryPolicy",
        "ServerError",
        "SgxPolicy",
        "SimulationNotAllowedError",
        "SimulationWarning",
        "Tensor",
        "TensorMetadata",
        "UsageError",
        "VerifiedAttestation",
        "__version__",
        "attest",
        "connect",
        "connect_async",
        "load_policy",
    ]
    for name in blindinfer.__all__:
        assert hasattr(blindinfer, name), name


def test_client_side_does_not_import_the_server_side() -> None:
    code = (
        "import json, sys, blindinfer, blindinfer.client.client, blindinfer.attestation.verifier,"
        " blindinfer.proxy.forward, blindinfer.proxy.grpc_forward;"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    offenders = [
        m for m in loaded if m.startswith(SERVER_SIDE) or m.split(".")[0] in SERVER_LIBRARIES
    ]
    assert offenders == []
    assert "blindinfer.client.client" in loaded  # the probe did import the client


def test_error_family() -> None:
    attestation = [
        blindinfer.QuoteVerificationError,
        blindinfer.QuoteParseError,
        blindinfer.DebugEnclaveError,
        blindinfer.SimulationNotAllowedError,
        blindinfer.PolicyMismatchError,
        blindinfer.KeyBindingError,
        blindinfer.FreshnessError,
    ]
    for error in attestation:
        assert issubclass(error, blindinfer.AttestationError)
    others = (
        blindinfer.PolicyError,
        blindinfer.ProtocolError,
        blindinfer.ServerError,
        blindinfer.ConnectionFailedError,
        blindinfer.UsageError,
    )
    for error in others:
        assert issubclass(error, blindinfer.BlindInferError)
        assert not issubclass(error, blindinfer.AttestationError)
    assert issubclass(blindinfer.UsageError, ValueError)  # code catching ValueError still works
