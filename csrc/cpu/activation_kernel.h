#pragma once
// The activations that follow a Linear, forward and backward: bias + GELU (erf or tanh form) and
// SwiGLU. Contracts and references: pyeff/ops/activation.py.
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/isa.h"

namespace pyeff::cpu {

enum class GeluApproximation { NONE = 0, TANH = 1 };

// Math in fp32 (fp64 for fp64 input). `bias_dtype` is the input's dtype, or float32 for
// bfloat16/float16 input.
struct BiasGeluForwardArgs {
  const void* x;     // (rows, cols), dtype
  const void* bias;  // (cols,), bias_dtype; null: no bias
  void* y;           // (rows, cols), dtype: gelu(x + bias)
  c10::ScalarType dtype, bias_dtype;
  int64_t rows, cols;
  GeluApproximation approximate;
};

struct BiasGeluBackwardArgs {
  const void* dy;    // (rows, cols), dtype
  const void* x;     // (rows, cols), dtype: the forward's input, before the bias
  const void* bias;  // (cols,), bias_dtype; null: no bias
  void* dx;          // (rows, cols), dtype: dy * gelu'(x + bias)
  void* dbias;       // (cols,), bias_dtype: dx summed over rows (before rounding); null: not wanted
  c10::ScalarType dtype, bias_dtype;
  int64_t rows, cols;
  GeluApproximation approximate;
};

// Rows of gate and up may be strided (the two halves of one packed array); everything else is
// contiguous except the gradient pair, which shares one row stride (one packed array, or two).
struct SwigluForwardArgs {
  const void* gate;  // (rows, cols), dtype, row stride gate_stride
  const void* up;    // (rows, cols), dtype, row stride up_stride
  void* y;           // (rows, cols), dtype, contiguous: silu(gate) * up
  int64_t gate_stride, up_stride;
  c10::ScalarType dtype;
  int64_t rows, cols;
};

struct SwigluBackwardArgs {
  const void* dy;    // (rows, cols), dtype, contiguous
  const void* gate;  // as in the forward
  const void* up;
  void* dgate;       // (rows, cols), dtype, row stride grad_stride
  void* dup;         // (rows, cols), dtype, row stride grad_stride
  int64_t gate_stride, up_stride, grad_stride;
  c10::ScalarType dtype;
  int64_t rows, cols;
};

PYEFF_ISA_DECLARE(void, bias_gelu_forward_kernel, (const BiasGeluForwardArgs& args))
PYEFF_ISA_DECLARE(void, bias_gelu_backward_kernel, (const BiasGeluBackwardArgs& args))
PYEFF_ISA_DECLARE(void, swiglu_forward_kernel, (const SwigluForwardArgs& args))
PYEFF_ISA_DECLARE(void, swiglu_backward_kernel, (const SwigluBackwardArgs& args))

}  // namespace pyeff::cpu
