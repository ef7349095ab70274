#!/usr/bin/env bash
# Installs the client and the server into .venv and runs `blindinfer demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "==> $*"; }

if [ -x .venv/bin/python ]; then step "using the existing .venv"; else step "creating .venv"; fi
python3 -m venv .venv
step "installing blindinfer with the server (-e '.[server]')"
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[server]'
step "running the demo (blindinfer demo)"
.venv/bin/blindinfer demo
