#!/usr/bin/env bash
# GPU check of the Triton kernels (correctness vs torch, timings side by side) and of the engine on CUDA.
# Needs a CUDA GPU with torch, triton, transformers and gymnasium installed. When this repo is not pip-installed, it
# is laid out in a temporary folder as pyproject's package-dir maps it (envs/ -> kvzap_lab.envs, ...).
# Usage: bash benchmarks/gpu_check.sh [--skip-engine] ; results go to stdout and, if $OUT is set, to $OUT/.
# Exit status 1 when a correctness check fails. CPU self-test: python benchmarks/gpu_check.py --device cpu --dry
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
if ! (cd /tmp && "$PYTHON" -c "import kvzap_lab.envs, kvzap_lab.policies") 2>/dev/null; then
  STAGE=$(mktemp -d)
  cp -r kvzap_lab "$STAGE/" && for d in envs policies studies; do cp -r "$d" "$STAGE/kvzap_lab/"; done
  export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
