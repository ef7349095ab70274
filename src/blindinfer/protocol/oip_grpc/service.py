"""The OIP v2 gRPC service's method table: paths on the wire and their message types.

Why by hand instead of protoc's ``_pb2_grpc`` module: the messages live in our own protobuf
package (see oip_v2.proto for why), while the method paths on the wire must stay
``/inference.GRPCInferenceService/<Method>`` for unmodified clients. The server registers
these with ``grpc.method_handlers_generic_handler``; a client builds its calls with
``channel.unary_unary(method.path, ...)``. Requests stay bytes until our own code parses them,
so a malformed message is our INVALID_ARGUMENT, not grpc's INTERNAL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blindinfer.protocol.oip_grpc import oip_v2_pb2 as pb

SERVICE_NAME = "inference.GRPCInferenceService"


@dataclass(frozen=True)
class Method:
    """One unary call of the service."""

    name: str
    request: type[Any]
    response: type[Any]

    @property
    def path(self) -> str:
        return f"/{SERVICE_NAME}/{self.name}"


SERVER_LIVE = Method("ServerLive", pb.ServerLiveRequest, pb.ServerLiveResponse)
SERVER_READY = Method("ServerReady", pb.ServerReadyRequest, pb.ServerReadyResponse)
MODEL_READY = Method("ModelReady", pb.ModelReadyRequest, pb.ModelReadyResponse)
SERVER_METADATA = Method("ServerMetadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse)
MODEL_METADATA = Method("ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse)
MODEL_INFER = Method("ModelInfer", pb.ModelInferRequest, pb.ModelInferResponse)
REPOSITORY_MODEL_LOAD = Method(
    "RepositoryModelLoad", pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse
)
REPOSITORY_MODEL_UNLOAD = Method(
    "RepositoryModelUnload", pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse
)

METHODS: tuple[Method, ...] = (
    SERVER_LIVE,
    SERVER_READY,
    MODEL_READY,
    SERVER_METADATA,
    MODEL_METADATA,
    MODEL_INFER,
    REPOSITORY_MODEL_LOAD,
    REPOSITORY_MODEL_UNLOAD,
)
