#!/usr/bin/env bash
# The time-boxed GPU benchmark job, from a checkout on a GPU host (perf/README.md; perf/gpu_evidence.py
# says what it runs):
#   bash perf/gpu_evidence.sh OUT_DIR [BUDGET_S]      # give the job a limit of BUDGET_S + 90 s
# The host needs python with torch and triton; it needs no network: wheels placed in .whl/ (peers,
# diffusers) are installed offline to /tmp/site, this package without dependencies (or, if that
# fails, it is made importable from the checkout); then `python -m perf.gpu_evidence` runs.
# Install output goes to OUT_DIR/log.txt.
set -uo pipefail
OUT_DIR=${1:?usage: bash perf/gpu_evidence.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-480}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
{
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || echo "pip install -e . failed"
} >>"$OUT_DIR/log.txt" 2>&1
if ! $PY -c "import gn_triton.kernels" 2>>"$OUT_DIR/log.txt"; then
  # kernels/ is installed as gn_triton.kernels; without an install, a link does the same.
  [ -e gn_triton/kernels ] || ln -s ../kernels gn_triton/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  echo "gn_triton imported from the checkout (gn_triton/kernels -> ../kernels)" >>"$OUT_DIR/log.txt"
fi
exec $PY -m perf.gpu_evidence --out "$OUT_DIR" --budget-s "$BUDGET"
