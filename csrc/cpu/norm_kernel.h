#pragma once
// LayerNorm and RMSNorm over the last dimension of a (rows, cols) array, with an optional fused
// residual add before the norm; forward and backward. Contract and reference: pyeff/ops/norm.py.
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/isa.h"

namespace pyeff::cpu {

// Statistics (mean, rstd) are float, or double for float64 input: the "stat type" below.
// `param_dtype` is the dtype of weight/bias/dweight/dbias: the input's dtype, or float32 for
// bfloat16/float16 input (fp32 parameters under mixed precision).
struct NormForwardArgs {
  const void* x;         // (rows, cols), dtype
  const void* residual;  // (rows, cols), dtype; null: no residual add
  const void* weight;    // (cols,), param_dtype; null: all ones
  const void* bias;      // (cols,), param_dtype; null: all zeros (always null for RMSNorm)
  void* y;               // (rows, cols), dtype
  void* sum;             // (rows, cols), dtype: x + residual, written when residual is given
  void* mean;            // (rows,), stat type; LayerNorm only
  void* rstd;            // (rows,), stat type
  c10::ScalarType dtype, param_dtype;
  int64_t rows, cols;
  double eps;
  bool rms;
};

struct NormBackwardArgs {
  const void* dy;      // (rows, cols), dtype: gradient of y
  const void* dsum;    // (rows, cols), dtype: gradient of the returned x + residual; null: none
  const void* h;       // (rows, cols), dtype: what was normalized (x, or x + residual)
  const void* weight;  // (cols,), param_dtype; null: all ones
  const void* mean;    // (rows,), stat type; LayerNorm only
  const void* rstd;    // (rows,), stat type
  void* dx;            // (rows, cols), dtype: gradient of h (so of x and of residual)
  void* dweight;       // (cols,), param_dtype; null: not wanted
  void* dbias;         // (cols,), param_dtype; null: not wanted
  c10::ScalarType dtype, param_dtype;
  int64_t rows, cols;
  bool rms;
};

PYEFF_ISA_DECLARE(void, norm_forward_kernel, (const NormForwardArgs& args))
PYEFF_ISA_DECLARE(void, norm_backward_kernel, (const NormBackwardArgs& args))

}  // namespace pyeff::cpu
