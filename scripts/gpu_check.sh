#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU: build against that machine's torch, run the GPU
# tests (the CUDA and Triton optimizer kernels, the compiled Triton layers, the CUDA memory pool)
# and the GPU benchmarks, and in the full mode the whole CPU suite there too (compatibility with
# that image's torch/Python). Logs and results go to $OUT (default ./gpu-out); every part prints
# its time. Wheels in .whl/ are installed first for packages the image lacks.
#
#   scripts/gpu_check.sh [quick|all|test|bench]
#     quick (default): build for this GPU's architecture only, the optimizer benchmark, the GPU
#                      tests, the other GPU benchmarks in their quick mode: 7 to 10 minutes on one H200
#                      (each step stops after STEP_TIMEOUT seconds, default 300, so the later ones run)
#     all: build for sm_80 and sm_90, the whole suite, the full benchmarks
#     test / bench: one half of `all`
#
# After a build it records the toolchain and probes one C++ error path ($OUT/toolchain.log): on the
# H200 image of 2026-11-28 every TORCH_CHECK failure in an earlier pyeff._C crashed (NOTE [one C++
# runtime] in setup.py; the build itself now checks this and stops if it fails).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/pyeff-site .whl/*.whl && export PYTHONPATH=/tmp/pyeff-site
fi

step() {  # step NAME CMD...: run (at most STEP_TIMEOUT s), log to $OUT/NAME.log, print the rc, the time and the last lines
  local name=$1 t0=$SECONDS rc
  shift
  echo "== $name"
  if declare -F "$1" >/dev/null; then "$@"; else timeout "${STEP_TIMEOUT:-0}" "$@"; fi >"$OUT/$name.log" 2>&1
  rc=$?
  echo "   rc=$rc ($((SECONDS - t0)) s)"
  tail -n 4 "$OUT/$name.log"
  return $rc
}

stamped() {  # CMD...: its output lines prefixed with the seconds since it started
  "$@" 2>&1 | $PY -u -c "import sys, time; t = time.time(); [print(f'{time.time() - t:6.1f} {l}', end='') for l in sys.stdin]"
}

gpu_tests() {  # the GPU tests in 8 processes, then those that take most of the GPU's memory alone
  local big=(tests/test_memory_cuda.py tests/test_optim_gpu.py::test_a_tensor_over_2_31_elements) per_test rc
  per_test=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120")
  PARALLEL=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  TRITON_INTERPRET=0 timeout "${STEP_TIMEOUT:-0}" $PY -m pytest -q -rfE $per_test $PARALLEL -m gpu tests/ \
    --deselect "${big[1]}" --ignore "${big[0]}"
  rc=$?
  TRITON_INTERPRET=0 timeout "${STEP_TIMEOUT:-0}" $PY -m pytest -q -rfE $per_test -m gpu "${big[@]}" || rc=$?
  return $rc
}

toolchain_report() {  # what links pyeff._C, what it needs, and whether a C++ error reaches Python
  local so
  so=$($PY -c "import pyeff._C as m; print(m.__file__)")
  set -x
  command -v c++ g++ cc; readlink -f "$(command -v c++)"; c++ --version | head -n 1
  env | grep -E '^(CC|CXX|LDFLAGS|CFLAGS|CXXFLAGS|LDSHARED)=' || true
  $PY -c "import sysconfig as s; [print(k, '=', s.get_config_var(k)) for k in ('CC', 'CXX', 'LDSHARED', 'LDFLAGS', 'LDCXXSHARED')]"
  g++ -print-file-name=libstdc++.so; g++ -print-file-name=libstdc++.a
  grep -E '^[ 0-9.]*(g\+\+|c\+\+|x86_64-linux-gnu-g\+\+).* -shared ' "$OUT/build.log" | tail -n 1
  readelf -dW "$so" | grep -E 'NEEDED|RPATH|RUNPATH'
  nm -DC --defined-only "$so" | grep -cE ' std::| __gnu_cxx::'
  $PY -X faulthandler -c "import torch; torch.zeros(2) + torch.zeros(3)" 2>&1 | tail -n 1
  $PY -X faulthandler pyeff/_cxx_runtime.py "$so"; echo "probe rc=$?"
  if command -v gdb >/dev/null; then
    gdb -q -batch -ex run -ex bt --args $PY pyeff/_cxx_runtime.py "$so" 2>&1 | tail -n 25
  fi
  set +x
  return 0
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
  nproc; } >"$OUT/machine.log" 2>&1
cat "$OUT/machine.log"
PHASE=${1:-quick}
case "$PHASE" in quick | all | test | bench) ;; *) echo "usage: $0 [quick|all|test|bench]" >&2; exit 2 ;; esac
if ! $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  # Without a GPU the script still builds, and runs what does not need one (a dry run).
  echo "gpu_check: torch sees no CUDA device: the GPU tests and benchmarks will skip"
elif [ "$PHASE" = quick ]; then  # compile for the GPU at hand only: half the nvcc time
  export PYEFF_CUDA_ARCHS=${PYEFF_CUDA_ARCHS:-$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")}
fi
[ "$PHASE" = quick ] && BENCH_ARGS="--quick ${BENCH_ARGS:-}" && STEP_TIMEOUT=${STEP_TIMEOUT:-300}
T0=$SECONDS
if [ "$PHASE" != bench ] || ! $PY -c "import pyeff._C" 2>/dev/null; then
  if ! step build stamped $PY -m pip install -v --no-build-isolation --no-deps -e .; then
    grep -E ' -shared |pyeff: ' "$OUT/build.log" | tail -n 3 >"$OUT/toolchain.log"  # the link and the probe's verdict
    exit 1
  fi
  step toolchain toolchain_report
fi
$PY -m pyeff info >>"$OUT/machine.log" 2>&1
if [ "$PHASE" = all ] || [ "$PHASE" = test ]; then
  PARALLEL=$($PY -c "import xdist" 2>/dev/null && echo "-n 14")
  step tests-cpu $PY -m pytest -q $PARALLEL -m "not gpu" tests/
fi
# The optimizer benchmark first: the figures the GPU kernels exist for, in minutes' time.
if [ "$PHASE" != test ]; then
  step bench-optim env TRITON_INTERPRET=0 $PY -m pyeff bench optim_gpu ${BENCH_ARGS:-} --out "$OUT/bench"
fi
if [ "$PHASE" != bench ]; then
  step tests-gpu gpu_tests
fi
if [ "$PHASE" != test ]; then
  for suite in optim_state gpu_layers gpu_pool; do  # one step each: a failing suite stops only itself
    step "bench-$suite" env TRITON_INTERPRET=0 $PY -m pyeff bench "$suite" ${BENCH_ARGS:-} --out "$OUT/bench"
  done
fi
echo "== total $((SECONDS - T0)) s"
