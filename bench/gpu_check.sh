#!/usr/bin/env bash
# The GPU path in one run (bench/gpu_check.py says what it checks): on a machine with one GPU,
# its preinstalled torch and nothing else installed, in 7.5 minutes (--budget-min).
#   bench/gpu_check.sh [--ptb-dir DIR] [--parts P,Q] [--out DIR]   # on the GPU
#   bench/gpu_check.sh --device cpu                     # a smoke run here, under a minute
# pipeline needs pydantic, which such machines may lack: where there is no package index, carry
# its wheels (pydantic, pydantic_core, annotated-types, typing-inspection for that Python) and
# install them first: pip install --no-index --target /tmp/site WHEELS; export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"   # make gpu-check sets PYTHON to the venv's
