#pragma once
// The CPU Adam/AdamW kernel's arguments: raw pointers and per-tensor step counts prepared and checked
// by csrc/adam.cpp. All tensors of one call share the parameter dtype and the mode.
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

#include "adam_math.h"
#include "cpu/isa.h"
#include "cpu/low_precision.h"

namespace pyeff::cpu {

struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // amsgrad only
  float* master;         // MASTER only
  void* compensation;    // KAHAN only (NOTE [low-precision parameter modes], cpu/low_precision.h)
  float* exp_avg_absmax;         // int8 codes only (NOTE [compressed optimizer state])
  float* exp_avg_sq_absmax;      // int8 codes only
  float* max_exp_avg_sq_absmax;  // int8 codes and amsgrad only
  int64_t seed;                  // stochastic rounding only (NOTE [random bits])
  int64_t numel;
  double step;           // the step count after this step's increment
};

struct AdamArgs {
  std::vector<AdamTensor> tensors;
  std::vector<int64_t> offsets;  // prefix sums of numels, size tensors.size() + 1
  c10::ScalarType dtype;         // parameter dtype
  c10::ScalarType grad_dtype;    // = dtype, or any of fp32/bf16/fp16 for fp32/bf16/fp16 parameters
  PrecisionMode mode;
  c10::ScalarType moment_dtype;  // the moments' storage: Float, Double, BFloat16, Half, Char (int8 codes)
  bool stochastic;               // round bf16 values and codes stochastically
  AdamHyper hyper;
  double lr;
  double grad_mult;  // gradients are multiplied by this first (inverse loss scale x clip coefficient)
};

PYEFF_ISA_DECLARE(void, adam_kernel, (const AdamArgs& args))

}  // namespace pyeff::cpu
