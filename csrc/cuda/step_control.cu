// step_control's CUDA backend: the math of csrc/step_control_math.h on one device thread (no host read),
// and registration as torch.ops.pyeff.step_control.cuda. Contract and reference:
// pyeff/ops/step_control.py.
#include <ATen/core/Tensor.h>

#include "cuda/runtime.cuh"
#include "step_control.h"
#include "step_control_math.h"

namespace pyeff::cuda {
namespace {

constexpr const char* kOp = "step_control";

__global__ void step_control_kernel(const float* stats, const float* grad_scale, const float* found_inf,
                                    float max_grad_norm, float* out) {
  step_control_math(stats, grad_scale, found_inf, max_grad_norm, out);
}

void step_control_cuda(const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, double max_grad_norm, const at::Tensor& out) {
  const StepControlInputs in = check_step_control(kOp, stats, grad_scale, found_inf, out);
  TORCH_CHECK(out.device().type() == kDeviceType, kOp, ": the cuda backend takes CUDA tensors, got ", out.device());
  const DeviceGuard guard(out.device());
  launch(&step_control_kernel, 1, 1, in.stats, in.grad_scale, in.found_inf, static_cast<float>(max_grad_norm),
         out.data_ptr<float>());
  bump_versions({at::TensorList(out)});
}

}  // namespace
}  // namespace pyeff::cuda

PYEFF_REGISTER_CUDA("step_control", &pyeff::cuda::step_control_cuda)
