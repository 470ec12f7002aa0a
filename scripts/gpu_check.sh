#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU: build against that machine's torch, run the
# whole test suite there (the CPU tests check compatibility with its torch/Python), the GPU tests
# (compiled Triton kernels, the CUDA memory pool) and the GPU benchmarks. Logs and results go to
# $OUT (default ./gpu-out). Wheels in .whl/ are installed first for packages the image lacks.
#
#   scripts/gpu_check.sh [all|test|bench]    (test: build + tests; bench: build if needed + benchmarks)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/pyeff-site .whl/*.whl && export PYTHONPATH=/tmp/pyeff-site
fi

step() {  # step NAME CMD...: run, log to $OUT/NAME.log, print the rc, the time and the last lines
  local name=$1 t0=$SECONDS rc
  shift
  echo "== $name"
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "   rc=$rc ($((SECONDS - t0)) s)"
  tail -n 4 "$OUT/$name.log"
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
  nproc; } >"$OUT/machine.log" 2>&1
cat "$OUT/machine.log"
PHASE=${1:-all}
if [ "$PHASE" != bench ] || ! $PY -c "import pyeff._C" 2>/dev/null; then
  step build $PY -m pip install --no-build-isolation --no-deps -e . || exit 1
fi
$PY -m pyeff info >>"$OUT/machine.log" 2>&1
if [ "$PHASE" != bench ]; then
  PARALLEL=$($PY -c "import xdist" 2>/dev/null && echo "-n 14")
  step tests-cpu $PY -m pytest -q $PARALLEL -m "not gpu" tests/
  step tests-gpu env TRITON_INTERPRET=0 $PY -m pytest -q -m gpu tests/
fi
if [ "$PHASE" != test ]; then
  step bench-gpu $PY -m pyeff bench gpu_layers ${BENCH_ARGS:-} --out "$OUT/bench"
fi
