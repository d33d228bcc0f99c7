#!/usr/bin/env bash
# The GPU path in one run (bench/gpu_check.py says what it checks): on a machine with one GPU,
# its preinstalled torch and nothing else installed, in 7.5 minutes (--budget-min).
#   bench/gpu_check.sh [--wheels DIR] [--ptb-dir DIR] [--parts P,Q] [--out DIR]   # on the GPU
#   bench/gpu_check.sh --device cpu                                              # a smoke run here
# pipeline needs pydantic, which such machines may lack; where there is no package index, carry
# its wheels: bench/gpu_wheels.sh downloads them (here), --wheels DIR installs them (there) into
# a temporary directory put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}   # make gpu-check sets PYTHON to the venv's
args=()
while (($#)); do
    if [[ $1 == --wheels ]]; then
        wheels=${2:?--wheels needs a directory of wheels}
        shift 2
    else
        args+=("$1")
        shift
    fi
done
if [[ -n ${wheels:-} ]]; then
    found=("$wheels"/*.whl)
    [[ -e ${found[0]} ]] || { echo "gpu_check: --wheels $wheels: no .whl files there" >&2; exit 2; }
    site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${found[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
status=0
"$python" bench/gpu_check.py "${args[@]}" || status=$?
if [[ -n ${site:-} ]]; then rm -rf "$site"; fi
exit $status
