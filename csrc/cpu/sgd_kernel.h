#pragma once
// The CPU SGD kernel's arguments: raw pointers prepared and checked by csrc/sgd.cpp. All tensors of
// one call share the parameter dtype and the precision mode (NOTE [low-precision parameter modes]
// in csrc/cpu/low_precision.h).
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

#include "cpu/isa.h"
#include "cpu/low_precision.h"
#include "sgd_math.h"

namespace pyeff::cpu {

struct SgdTensor {
  void* param;
  const void* grad;
  void* momentum_buffer;  // with momentum only
  float* master;          // MASTER only
  void* compensation;     // KAHAN only
  bool first_step;        // momentum_buffer is created from the gradient (pyeff/ops/sgd.py)
};

struct SgdArgs {
  std::vector<SgdTensor> tensors;
  std::vector<int64_t> offsets;  // prefix sums of numels, size tensors.size() + 1
  c10::ScalarType dtype;         // parameter dtype
  c10::ScalarType grad_dtype;    // = dtype, or any of fp32/bf16/fp16 for fp32/bf16/fp16 parameters
  PrecisionMode mode;
  SgdHyper hyper;
  double lr;
  double grad_mult;  // gradients are multiplied by this first (inverse loss scale x clip coefficient)
};

PYEFF_ISA_DECLARE(void, sgd_kernel, (const SgdArgs& args))

}  // namespace pyeff::cpu
