// sgd_step's CPU backend (csrc/cpu/sgd_kernel.cpp): checks (csrc/sgd.h), the host-side scalars, and
// registration as torch.ops.pyeff.sgd_step.cpu. Contract and reference: pyeff/ops/sgd.py.
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu/sgd_kernel.h"
#include "sgd.h"
#include "op_call.h"

namespace pyeff {
namespace {

constexpr const char* kOp = "sgd_step";

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const c10::List<bool>& is_first_step, at::TensorList master_params, at::TensorList compensations,
                  double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                  const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& lr_tensor) {
  const OptimizerInputs in = check_sgd_step(kOp, params, grads, momentum_buffers, is_first_step, master_params,
                                     compensations, momentum, grad_mult, found_inf, lr_tensor);
  const size_t n = params.size();
  if (n == 0) return;
  TORCH_CHECK(params[0].device().is_cpu(), kOp, ": the cpu backend takes CPU tensors, got ", params[0].device());
  const GradScaling scaling = grad_scaling(kOp, grad_mult, found_inf);
  if (scaling.skip) return;  // NOTE [overflow skip] (checks.h)

  cpu::SgdArgs a;
  a.tensors.resize(n);
  a.offsets = numel_offsets(params);
  a.dtype = in.dtype;
  a.grad_dtype = in.grad_dtype;
  a.mode = in.low.mode;
  a.hyper = {momentum, dampening, weight_decay, nesterov, maximize, scaling.has_mult};
  a.lr = lr_tensor ? host_scalar(kOp, "lr_tensor", *lr_tensor) : lr;
  a.grad_mult = scaling.mult;
  const bool with_momentum = momentum != 0;
  for (size_t i = 0; i < n; ++i) {
    cpu::SgdTensor& t = a.tensors[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    t.momentum_buffer = with_momentum ? momentum_buffers[i].data_ptr() : nullptr;
    t.master = in.low.master(i);
    t.compensation = in.low.compensation(i);
    t.first_step = with_momentum && is_first_step.get(i);
  }

  PYEFF_ISA_SELECT(sgd_kernel)(a);

  bump_versions({params, momentum_buffers, master_params, compensations});
}

// The checks alone, for the backends that write through raw addresses (Triton): sgd_step.check.
void sgd_step_check(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const c10::List<bool>& is_first_step, at::TensorList master_params, at::TensorList compensations,
                    double, double momentum, double, double, bool, bool, const std::optional<at::Tensor>& grad_mult,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor) {
  check_sgd_step(kOp, params, grads, momentum_buffers, is_first_step, master_params, compensations, momentum,
                 grad_mult, found_inf, lr_tensor);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("sgd_step.cpu", &sgd_step_cpu); }
PYEFF_OP_CALL(sgd_step, sgd_step_cpu);  // NOTE [calling an op from Python]
TORCH_LIBRARY_IMPL(pyeff, CompositeExplicitAutograd, m) { m.impl("sgd_step.check", &sgd_step_check); }

}  // namespace pyeff
