// step_control's CPU backend (csrc/step_control_math.h): checks (csrc/step_control.h) and registration
// as torch.ops.pyeff.step_control.cpu. Contract and reference: pyeff/ops/step_control.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "step_control.h"
#include "step_control_math.h"
#include "op_call.h"

namespace pyeff {
namespace {

constexpr const char* kOp = "step_control";

void step_control_cpu(const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, double max_grad_norm, const at::Tensor& out) {
  const StepControlInputs in = check_step_control(kOp, stats, grad_scale, found_inf, out);
  TORCH_CHECK(out.device().is_cpu(), kOp, ": the cpu backend takes CPU tensors, got ", out.device());
  step_control_math(in.stats, in.grad_scale, in.found_inf, static_cast<float>(max_grad_norm), out.data_ptr<float>());
  bump_versions({at::TensorList(out)});
}

void step_control_check(const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, double, const at::Tensor& out) {
  check_step_control(kOp, stats, grad_scale, found_inf, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("step_control.cpu", &step_control_cpu); }
PYEFF_OP_CALL(step_control, step_control_cpu);  // NOTE [calling an op from Python]
TORCH_LIBRARY_IMPL(pyeff, CompositeExplicitAutograd, m) { m.impl("step_control.check", &step_control_check); }

}  // namespace pyeff
