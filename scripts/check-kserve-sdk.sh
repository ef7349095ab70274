#!/usr/bin/env bash
# The KServe SDK's gRPC client (InferenceGRPCClient) through the attesting proxy, bit-exact.
# Not part of ./scripts/test.sh: the SDK brings pandas, kubernetes and fastapi pins of its
# own, so it gets a virtualenv of its own (VENV, default /tmp/blindinfer-kserve-venv) and
# runs as a separate process. Needs the test environment (./scripts/test.sh) first.
# Usage: scripts/check-kserve-sdk.sh [KSERVE_VERSION]   (default 0.21.0, the one checked)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-0.21.0}"
venv="${VENV:-/tmp/blindinfer-kserve-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "kserve==$version"
.venv/bin/python scripts/kserve-sdk-check/through_proxy.py "$venv/bin/python"
