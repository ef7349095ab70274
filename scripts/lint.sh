#!/usr/bin/env bash
# Static checks: ruff on everything, mypy --strict on the package.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench tools
.venv/bin/ruff format --check src || true  # formatting is advisory
.venv/bin/mypy src
