#!/usr/bin/env bash
# Build pyeff._C with its CUDA kernels against a CUDA build of torch, on a machine without a GPU,
# and import it: every CUDA kernel must compile for sm_80 and sm_90, link against torch's CUDA
# libraries and register as torch.ops.pyeff.<op>.cuda. Nothing built here runs a kernel (no GPU);
# tests/test_cuda_emulation.py runs their code on the CPU, scripts/gpu_check.sh on a GPU.
#
#   scripts/cuda_build_check.sh        (make cuda-build-check; CI runs it)
#
# The CUDA torch (several GB, from the package index or local disk) goes into its own venv
# ($CUDA_VENV, default .venv-cuda), the build into a copy of the source tree. The CUDA toolkit is
# the one nvcc runs from, or $CUDA_HOME; its major version must be torch's (setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${CUDA_VENV:-.venv-cuda}")  # absolute: the build runs in a copy of the tree
TORCH_PIN=${CUDA_TORCH:-torch==2.14.1}
export MAX_JOBS=${MAX_JOBS:-2} PYEFF_CUDA_ARCHS=${PYEFF_CUDA_ARCHS:-80;90}
t0=$SECONDS
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  # The CUDA torch and its libraries take about 6 GB installed, and as much again while pip unpacks
  # them: say so up front rather than fail half-way with ENOSPC.
  mkdir -p "$(dirname "$VENV")"
  free_gb=$(df -P -BG "$(dirname "$VENV")" "${TMPDIR:-/tmp}" | awk 'NR > 1 {gsub("G", "", $4); print $4}' | sort -n | head -1)
  if [ "$free_gb" -lt "${CUDA_VENV_MIN_GB:-12}" ]; then
    echo "cuda-build-check: ${free_gb} GB free where $VENV and pip's temporary files go; the CUDA torch needs" \
         "about ${CUDA_VENV_MIN_GB:-12} GB (free some space, or point CUDA_VENV / TMPDIR elsewhere)" >&2
    exit 1
  fi
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_PIN" ninja numpy "setuptools>=77"
fi
echo "cuda-build-check: torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') ($((SECONDS - t0)) s)"
SRC=$(mktemp -d)/pyeff
mkdir -p "$SRC"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$SRC"
(cd "$SRC" && "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .)
echo "cuda-build-check: built ($((SECONDS - t0)) s)"
cd "$SRC"  # import the copy just built, not the source tree's own build
"$VENV/bin/python" - <<'PY'
import torch
import pyeff
from pyeff.ops import OPS

assert pyeff._ext.built_with_cuda(), pyeff._ext.load_error()
missing = [name for name in ("adam_step", "adagrad_step", "sgd_step", "grad_stats", "step_control")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pyeff::{name}.cuda", "CUDA")]
assert not missing, f"CUDA kernels not registered: {missing}"
print("cuda-build-check: CUDA kernels registered:",
      ", ".join(n for n, op in OPS.items() if op.has("cuda")))
p = torch.nn.Parameter(torch.randn(10)); p.grad = torch.randn(10)
pyeff.optim.AdamW([p]).step()  # the CPU kernels of the same build still run
PY
cd - >/dev/null
rm -rf "$(dirname "$SRC")"
echo "cuda-build-check: ok ($((SECONDS - t0)) s)"
