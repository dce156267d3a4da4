#!/usr/bin/env bash
# What a GPU session owes, in two device calls of under 10 minutes each:
#   bash perf/gpu_run.sh check OUT_DIR   # the test suite on the GPU + compute-sanitizer memcheck of every path
#   bash perf/gpu_run.sh bench OUT_DIR [perf.sweep args, e.g. --full]   # the sweep, plots, SUMMARY.md, model bench
# ("all" runs both in one call, for a longer limit). Logs and results land in OUT_DIR
# (e.g. perf/results/<gpu-name>/, committed afterwards).
#
# Peers and extras missing on the machine (Liger-Kernel, apex, diffusers) can travel as wheels in
# .whl/ (see the device tool's README); they are installed to /tmp/site when present.
set -uo pipefail
PHASE=${1:-all}
OUT=${2:-perf/out/gpu_run}
shift 2 2>/dev/null || shift $#
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

status=0
if [ "$PHASE" = check ] || [ "$PHASE" = all ]; then
  echo "== tests on the GPU"
  timeout 420 $PY -m pytest --device=cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -8 || status=1
  echo "== compute-sanitizer memcheck"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 1 $PY perf/sanitize_case.py 2>&1 \
    | tee "$OUT/memcheck.log" | tail -5 || status=1
fi
if [ "$PHASE" = bench ] || [ "$PHASE" = all ]; then
  echo "== perf sweep"
  timeout 420 $PY -m perf.sweep --out "$OUT" "$@" 2>&1 | tee "$OUT/sweep.log" | tail -40 || status=1
  echo "== a real model: diffusers UNet/VAE forward+backward, torch vs converted"
  timeout 120 $PY -m perf.model_bench --out "$OUT" 2>&1 | tee "$OUT/model_bench.log" | tail -8 || status=1
fi
exit $status
