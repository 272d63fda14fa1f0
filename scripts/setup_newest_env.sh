#!/usr/bin/env bash
# Create .venv-newest: diffusers-robust with its test extras and the newest releases pyproject.toml allows (what
# `pip install .` resolves today), except torch, held at the CPU build 2.13.0 (an unpinned torch is a multi-GB CUDA build).
# Idempotent: re-running upgrades to whatever is newest now.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv-newest/bin/python ]; then
    "$PYTHON" -m venv .venv-newest
fi
.venv-newest/bin/python -m pip install --quiet --upgrade pip
echo "torch==2.13.0" > .venv-newest/torch-pin.txt
.venv-newest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -c .venv-newest/torch-pin.txt -e ".[test]"
