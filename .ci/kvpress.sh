#!/usr/bin/env bash
# kvpress interoperability, run by .ci/run after the main tests. kvpress 0.5.5 pins transformers<5.3 and the lab
# needs >=5.24, so kvpress gets a venv of its own (torch CPU wheel first, then kvpress, gymnasium for
# `import kvzap_lab`, and the lab itself with --no-deps). On the test bed, the presses that kvzap_lab.kvpress
# exports must score like the lab's scorers (1e-5) and mask exactly the pairs the lab's engine evicts
# (.ci/kvpress_parity.py); any difference, or any install failure, fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1

python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q torch==2.13.0
"$work/venv/bin/python" -m pip install -q kvpress==0.5.5 "gymnasium>=1.0"
"$work/venv/bin/python" -m pip install -q --no-deps -e .
"$work/venv/bin/python" -c "from importlib.metadata import version as v; print('kvpress', v('kvpress'), 'transformers', v('transformers'))"

.venv/bin/python .ci/kvpress_parity.py lab "$work/out"
"$work/venv/bin/python" .ci/kvpress_parity.py kvpress "$work/out"
echo "kvpress interoperability check passed in $((SECONDS - start)) s"
