#!/usr/bin/env bash
# Installs the client and the server into .venv and runs `blindinfer demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[server]'
.venv/bin/blindinfer demo
