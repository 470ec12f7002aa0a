// step_control's CUDA backend: the math of csrc/step_control.h on one device thread (no host read),
// and registration as torch.ops.pyeff.step_control.cuda. Contract and reference:
// pyeff/ops/step_control.py.
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "cuda/runtime.cuh"
#include "step_control.h"

namespace pyeff::cuda {
namespace {

constexpr const char* kOp = "step_control";

__global__ void step_control_kernel(const float* stats, const float* grad_scale, const float* found_inf,
                                    float max_grad_norm, float* out) {
  step_control_math(stats, grad_scale, found_inf, max_grad_norm, out);
}

const float* optional_data(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& out,
                           int64_t numel = 1) {
  if (!t) return nullptr;
  check_scalar(kOp, name, *t, out.device(), false, numel);
  return t->const_data_ptr<float>();
}

void step_control_cuda(const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, double max_grad_norm, const at::Tensor& out) {
  check_scalar(kOp, "out", out, out.device(), false, 4);
  TORCH_CHECK(out.device().type() == kDeviceType && out.is_contiguous(), kOp,
              ": the cuda backend takes a contiguous `out` on a CUDA device, got ", out.device());
  const float* s = optional_data("stats", stats, out, 2);
  const float* scale = optional_data("grad_scale", grad_scale, out);
  const float* found = optional_data("found_inf", found_inf, out);
  const DeviceGuard guard(out.device());
  launch(&step_control_kernel, 1, 1, s, scale, found, static_cast<float>(max_grad_norm), out.data_ptr<float>());
  bump_versions({at::TensorList(out)});
}

}  // namespace
}  // namespace pyeff::cuda

PYEFF_REGISTER_CUDA("step_control", &pyeff::cuda::step_control_cuda)
