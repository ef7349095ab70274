"""Wire codecs shared by the blindinfer client and server.

Modules:

- `datatypes`: Open Inference Protocol (KServe v2 / Triton) datatype names <-> numpy
  little-endian dtypes <-> ONNX Runtime tensor type strings.
- `limits`: `TensorLimits`, the explicit bounds every parser of untrusted tensors uses.
- `inference`: OIP v2 inference request/response bodies, JSON tensors and the binary
  tensor data extension (`Inference-Header-Content-Length`).
- `evidence`: the attestation message.
- `strict_json`: the one strict JSON decoder (no duplicate keys; NaN only where allowed).
- `generation`, `openai_requests`, `openai_responses` (both re-exported by `openai_api`),
  `oip_generate`, `sse`: the generative wire formats (OpenAI-compatible API, OIP generate).

Every parser here turns untrusted bytes into typed, frozen values once, and raises nothing
but `blindinfer.errors.ProtocolError` (with a machine-readable `code`). This package imports
only the standard library, numpy and `blindinfer.errors`, never the client, server or TEE
code, so that both sides run the very same codec. Nothing is re-exported here on purpose:
importing `blindinfer.protocol.evidence` should not pay for numpy.
"""
