#pragma once
// After an optimizer kernel: every step count + 1, unless found_inf is set (NOTE [overflow skip],
// csrc/checks.h), on the device, in one launch. The update kernel read the counts before this runs
// (same stream), so no block of it sees a count already advanced.
#include <ATen/core/Tensor.h>

#include <vector>

#include "cuda/elementwise.cuh"

namespace pyeff::cuda {

struct StepEntry {
  void* step;
  int64_t numel;  // 1
};

struct AdvanceSteps {
  C10_DEVICE void operator()(const StepEntry& e, int64_t, int64_t, bool is_double, const float* found_inf) const {
    if (threadIdx.x != 0 || (found_inf != nullptr && *found_inf != 0)) return;
    if (is_double) {
      *static_cast<double*>(e.step) += 1;
    } else {
      *static_cast<float*>(e.step) += 1;
    }
  }
};

inline bool check_same_step_dtype(at::TensorList steps) {
  for (const auto& t : steps) {
    if (t.scalar_type() != steps[0].scalar_type()) return false;
  }
  return true;
}

inline void advance_steps(at::TensorList steps, const float* found_inf) {
  std::vector<StepEntry> entries;
  std::vector<int64_t> work;
  for (const auto& t : steps) {
    entries.push_back({t.data_ptr(), 1});
    work.push_back(1);
  }
  const bool is_double = !steps.empty() && steps[0].scalar_type() == at::kDouble;
  launch_multi_tensor(entries, work, AdvanceSteps{}, is_double, found_inf);
}

}  // namespace pyeff::cuda
