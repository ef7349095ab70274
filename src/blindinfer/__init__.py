"""blindinfer: confidential AI inference with verified remote attestation.

The public API is the client side: `connect()` verifies the server's TEE evidence against
a policy before any data is sent. The server lives in `blindinfer.server` and is never
imported from here.
"""

__version__ = "0.1.0"

from blindinfer.attestation.intel.sgx_policy import MaskedValue, SgxPolicy
from blindinfer.attestation.policy import Policy, load_policy
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.client.async_client import AsyncClient, connect_async
from blindinfer.client.client import Client, attest, connect
from blindinfer.client.models import ModelInfo, ModelMetadata, TensorMetadata
from blindinfer.client.retry import NO_RETRY, RetryPolicy
from blindinfer.client.tensors import Tensor
from blindinfer.errors import (
    AttestationError,
    BlindInferError,
    ConnectionFailedError,
    DebugEnclaveError,
    FreshnessError,
    KeyBindingError,
    Mismatch,
    PolicyError,
    PolicyMismatchError,
    ProtocolError,
    QuoteParseError,
    QuoteVerificationError,
    ServerError,
    SimulationNotAllowedError,
    SimulationWarning,
    UsageError,
)

__all__ = [
    "NO_RETRY",
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
