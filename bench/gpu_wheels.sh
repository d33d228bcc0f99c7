#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on a GPU machine that has torch but no pydantic and no
# package index: pydantic and what it requires, at the versions this checkout's environment
# runs, for that machine's Python (3.12 unless given), downloaded here into DIR (.whl, ignored
# by git). Then, on the GPU machine: bench/gpu_check.sh --wheels DIR --out OUT
#   bench/gpu_wheels.sh [DIR] [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl} version=${2:-3.12}
python=${PYTHON:-.venv/bin/python}
mapfile -t pins < <("$python" - <<'PY'
from importlib.metadata import version
for name in ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing-extensions"):
    print(f"{name}=={version(name)}")
PY
)
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "${pins[@]}"
echo "$dir: ${pins[*]} (Python $version)"
