#pragma once
// One pass that writes dst = src * scale and returns the statistics of what it wrote (the DDP comm
// hook's average of an all-reduced gradient bucket, with the mixed-precision step's statistics).
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/grad_stats_kernel.h"
#include "cpu/isa.h"

namespace pyeff::cpu {

struct ScaleGradStatsArgs {
  const void* src;
  void* dst;  // may be src
  c10::ScalarType src_dtype, dst_dtype;  // float32, bfloat16, float16 in any pair, or float64 for both
  int64_t numel;
  double scale;
};

PYEFF_ISA_DECLARE(GradStats, scale_grad_stats_kernel, (const ScaleGradStatsArgs& args))

}  // namespace pyeff::cpu
