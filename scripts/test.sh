#!/usr/bin/env bash
# Installs blindinfer with its test dependencies into .venv and runs the whole suite.
# Works on a fresh machine with only Python and pip. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch only serves the MiniLM export in the tests; the 2.13.0 CPU build is small and, on
# this project's machines, already on disk. Installed first so nothing pulls a CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check 'torch==2.13.0'
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
# BlindAI Core's unmodified client, for the compatibility tests (no deps: see pyproject)
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps \
    'blindai==0.6.3' 'sgx-dcap-quote-verify-python'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest "$@"
