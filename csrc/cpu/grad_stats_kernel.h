#pragma once
// One read-only pass over many gradients: their global sum of squares and whether any element
// is inf or NaN (the overflow check and the clipping norm of the mixed-precision step).
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

#include "cpu/isa.h"

namespace pyeff::cpu {

struct GradStatsArgs {
  std::vector<const void*> data;
  std::vector<c10::ScalarType> dtypes;  // float32, float64, bfloat16, float16; may differ per tensor
  std::vector<int64_t> offsets;         // prefix sums of numels
};

struct GradStats {
  double sum_of_squares;
  bool nonfinite;
};

PYEFF_ISA_DECLARE(GradStats, grad_stats_kernel, (const GradStatsArgs& args))

}  // namespace pyeff::cpu
