"""The Open Inference Protocol v2 over gRPC, next to the REST API (`serve --grpc-port`).

Same state, same TLS identity, same limits, keys, quotas, audit and error codes as REST;
see docs/grpc.md. Modules: listener (thread, loop, TLS credentials), servicer (the calls),
status (errors -> gRPC status codes), caller (API key from metadata).
"""

from blindinfer.server.grpc.listener import GrpcListener, serve_grpc

__all__ = ["GrpcListener", "serve_grpc"]
