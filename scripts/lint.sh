#!/usr/bin/env bash
# Static checks: ruff on everything, mypy --strict on the package.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "==> $*"; }

step "ruff check (src tests bench tools)"
.venv/bin/ruff check src tests bench tools deploy
step "ruff format --check src (advisory)"
.venv/bin/ruff format --check src || true  # formatting is advisory
step "mypy --strict src"
.venv/bin/mypy src
