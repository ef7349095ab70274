#!/usr/bin/env bash
# Regenerates the Python message modules of the OIP v2 gRPC protocol from our .proto
# (src/blindinfer/protocol/oip_grpc/oip_v2.proto). Needs grpcio-tools==1.81.1 (the test
# extra): another version writes different bytes, and tests/unit/test_grpc_generated.py
# compares the checked-in modules with this command's output byte for byte.
# Usage: scripts/gen-grpc.sh [OUTPUT_ROOT]   (default: src, i.e. in place)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-src}"
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -I src \
    --python_out="$out" --pyi_out="$out" \
    blindinfer/protocol/oip_grpc/oip_v2.proto
