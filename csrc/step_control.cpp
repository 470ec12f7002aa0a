// step_control's CPU backend (csrc/step_control.h): checks and registration as
// torch.ops.pyeff.step_control.cpu. Contract and reference: pyeff/ops/step_control.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "step_control.h"

namespace pyeff {
namespace {

constexpr const char* kOp = "step_control";

const float* optional_data(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& out,
                           int64_t numel = 1) {
  if (!t) return nullptr;
  check_scalar(kOp, name, *t, out.device(), false, numel);
  return t->const_data_ptr<float>();
}

void step_control_cpu(const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, double max_grad_norm, const at::Tensor& out) {
  check_scalar(kOp, "out", out, out.device(), false, 4);
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), kOp, ": expected a contiguous `out` on the CPU");
  step_control_math(optional_data("stats", stats, out, 2), optional_data("grad_scale", grad_scale, out),
                    optional_data("found_inf", found_inf, out), static_cast<float>(max_grad_norm),
                    out.data_ptr<float>());
  bump_versions({at::TensorList(out)});
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("step_control.cpu", &step_control_cpu); }

}  // namespace pyeff
