#!/usr/bin/env bash
# Everything a GPU session owes, in one device call (about 10 minutes): the test suite on the GPU,
# compute-sanitizer memcheck on a small forward+backward of every path, the static kernel report,
# and the default perf sweep with plots and SUMMARY.md. Logs and results land in one folder.
#
#   bash perf/gpu_run.sh [OUT_DIR] [extra perf.sweep args, e.g. --full]
#
# Peers and extras missing on the machine (Liger-Kernel, apex, diffusers) can travel as wheels in
# .whl/ (see the device tool's README); they are installed to /tmp/site when present.
set -uo pipefail
OUT=${1:-perf/out/gpu_run}
shift || true
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 GN_TRITON_AUTOTUNE=${GN_TRITON_AUTOTUNE:-1}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

status=0
echo "== tests on the GPU"
timeout 240 $PY -m pytest --device=cuda -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5 || status=1
echo "== compute-sanitizer memcheck"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 $PY perf/sanitize_case.py 2>&1 | tee "$OUT/memcheck.log" | tail -5 || status=1
echo "== perf sweep"
timeout 300 $PY -m perf.sweep --out "$OUT" "$@" 2>&1 | tee "$OUT/sweep.log" | tail -40 || status=1
echo "== a real model: diffusers UNet/VAE forward+backward, torch vs converted"
timeout 90 $PY -m perf.model_bench --out "$OUT" 2>&1 | tee "$OUT/model_bench.log" | tail -8 || status=1
exit $status
