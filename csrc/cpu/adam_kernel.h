#pragma once
// The CPU Adam/AdamW kernel's arguments: raw pointers and per-tensor coefficients prepared and
// checked by csrc/adam.cpp. All tensors of one call share the parameter dtype and the mode.
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

#include "cpu/isa.h"

namespace pyeff::cpu {

// NOTE [low-precision parameter modes]
// PLAIN:  moments in the parameter's dtype (as torch.optim), math in fp32/fp64, one rounding per store.
// MASTER: bf16/fp16 parameter with an fp32 master copy and fp32 moments; the update is computed on the
//         master and the parameter is written as the master rounded to nearest even.
// KAHAN:  bf16/fp16 parameter and moments plus a compensation buffer in the parameter's dtype that
//         carries the rounding error of each update into the next (compensated summation).
enum class PrecisionMode { PLAIN = 0, MASTER = 1, KAHAN = 2 };

struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // amsgrad only
  float* master;         // MASTER only
  void* compensation;    // KAHAN only
  double step_size;      // lr / (1 - beta1^step)
  double bias_correction2_sqrt;
};

struct AdamArgs {
  std::vector<AdamTensor> tensors;
  std::vector<int64_t> offsets;  // prefix sums of numels, size tensors.size() + 1
  c10::ScalarType dtype;         // parameter dtype
  c10::ScalarType grad_dtype;    // = dtype, or any of fp32/bf16/fp16 for fp32/bf16/fp16 parameters
  PrecisionMode mode;
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled_weight_decay;
  bool has_grad_mult;
  double grad_mult;  // gradients are multiplied by this first (inverse loss scale x clip coefficient)
};

PYEFF_ISA_DECLARE(void, adam_kernel, (const AdamArgs& args))

}  // namespace pyeff::cpu
