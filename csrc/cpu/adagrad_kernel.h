#pragma once
// The CPU Adagrad kernel's arguments: raw pointers and per-tensor coefficients prepared and checked
// by csrc/adagrad.cpp. All tensors of one call share the parameter dtype and the precision mode
// (NOTE [low-precision parameter modes] in csrc/cpu/low_precision.h).
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

#include "adagrad_math.h"
#include "cpu/isa.h"
#include "cpu/low_precision.h"

namespace pyeff::cpu {

// NOTE [sparse Adagrad rows]
// A sparse (COO, coalesced) gradient is a list of rows: row r of its values (row_numel elements,
// the product of its dense dimensions) belongs at element offset row_offsets[r] of the parameter,
// and of every state tensor laid out like it. Coalesced indices are unique, so rows never overlap
// and the kernel can update them in parallel; nothing outside the touched rows is read or written.
struct AdagradTensor {
  void* param;
  const void* grad;        // dense gradient, or the coalesced values of a sparse one
  void* sum;
  float* master;           // MASTER only
  void* compensation;      // KAHAN only
  float* sum_absmax;       // uint8 codes only (NOTE [compressed optimizer state])
  int64_t seed;            // stochastic rounding only (NOTE [random bits])
  int64_t numel;           // the parameter's
  double step;             // the step count after this step's increment
  const int64_t* row_offsets = nullptr;  // sparse only: nnz offsets into param (NOTE [sparse Adagrad rows])
  int64_t row_numel = 0;                 // sparse only
};

struct AdagradArgs {
  std::vector<AdagradTensor> tensors;
  // Prefix sums of the elements each tensor contributes to the one parallel region: numel for a
  // dense gradient, nnz x row_numel for a sparse one. Size tensors.size() + 1.
  std::vector<int64_t> offsets;
  c10::ScalarType dtype;       // parameter dtype
  c10::ScalarType grad_dtype;  // = dtype, or any of fp32/bf16/fp16 for fp32/bf16/fp16 parameters
  PrecisionMode mode;
  c10::ScalarType sum_dtype;  // the sums' storage: Float, Double, BFloat16, Half, Byte (uint8 codes)
  bool stochastic;            // round bf16 values and codes stochastically
  AdagradHyper hyper;
  double lr;
  double grad_mult;  // gradients are multiplied by this first (inverse loss scale x clip coefficient)
};

PYEFF_ISA_DECLARE(void, adagrad_kernel, (const AdagradArgs& args))

}  // namespace pyeff::cpu
