#pragma once
// step_control's input checks, shared by its CPU (csrc/step_control.cpp) and CUDA
// (csrc/cuda/step_control.cu) registrations. Contract and reference: pyeff/ops/step_control.py.
#include <ATen/core/Tensor.h>

#include "checks.h"

namespace pyeff {

struct StepControlInputs {
  const float* stats;  // null when absent
  const float* grad_scale;
  const float* found_inf;
};

inline StepControlInputs check_step_control(const char* op, const std::optional<at::Tensor>& stats,
                                            const std::optional<at::Tensor>& grad_scale,
                                            const std::optional<at::Tensor>& found_inf, const at::Tensor& out) {
  check_scalar(op, "out", out, out.device(), false, 4);
  TORCH_CHECK(out.is_contiguous(), op, ": expected `out` to be contiguous");
  auto data = [&](const char* name, const std::optional<at::Tensor>& t, int64_t numel) -> const float* {
    if (!t) return nullptr;
    check_scalar(op, name, *t, out.device(), false, numel);
    TORCH_CHECK(t->is_contiguous(), op, ": expected `", name, "` to be contiguous");
    return t->const_data_ptr<float>();
  };
  return {data("stats", stats, 2), data("grad_scale", grad_scale, 1), data("found_inf", found_inf, 1)};
}

}  // namespace pyeff
