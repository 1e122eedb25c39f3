#!/usr/bin/env bash
# GPU check of the Triton kernels (correctness vs torch, timings side by side) and of the engine on CUDA.
# Needs a CUDA GPU with torch, triton and transformers installed; no pip install of this repo is needed.
# Usage: bash benchmarks/gpu_check.sh [--skip-engine] ; results go to stdout and, if $OUT is set, to $OUT/.
# Exit status 1 when a correctness check fails. CPU self-test: python benchmarks/gpu_check.py --device cpu --dry
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
exec "$PYTHON" benchmarks/gpu_check.py "$@"
