// pyeff::adam_step_cpu: input checks and registration of the CPU Adam/AdamW kernel
// (csrc/cpu/adam_kernel.cpp). The contract and the reference live in pyeff/ops/adam.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "cpu/adam_kernel.h"

namespace pyeff {
namespace {

constexpr const char* kOp = "adam_step";

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                   at::TensorList master_params, at::TensorList compensations, double lr, double beta1,
                   double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                   bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_mult,
                   const std::optional<at::Tensor>& found_inf) {
  // ---- checks: nothing is written before all of them pass
  const size_t n = params.size();
  check_length(kOp, "grads", grads, n);
  check_length(kOp, "exp_avgs", exp_avgs, n);
  check_length(kOp, "exp_avg_sqs", exp_avg_sqs, n);
  check_length(kOp, "max_exp_avg_sqs", max_exp_avg_sqs, amsgrad ? n : 0);
  check_length(kOp, "state_steps", state_steps, n);
  const LowPrecisionState low(kOp, params, master_params, compensations);
  if (n == 0) return;

  const auto dtype = params[0].scalar_type();
  const auto grad_dtype = grads[0].scalar_type();
  check_optimizer_dtypes(kOp, dtype, grad_dtype);
  const auto state_dtype = low.state_dtype(dtype);
  const auto cpu = c10::DeviceType::CPU;
  std::vector<double> steps(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    check_same_layout(kOp, "params", i, p, p, dtype, cpu);
    check_same_layout(kOp, "grads", i, grads[i], p, grad_dtype, cpu);
    check_same_layout(kOp, "exp_avgs", i, exp_avgs[i], p, state_dtype, cpu);
    check_same_layout(kOp, "exp_avg_sqs", i, exp_avg_sqs[i], p, state_dtype, cpu);
    if (amsgrad) check_same_layout(kOp, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], p, state_dtype, cpu);
    low.check(kOp, i, p, dtype);
    steps[i] = host_scalar(kOp, "state_steps", state_steps[i]);
  }
  const GradScaling scaling = grad_scaling(kOp, grad_mult, found_inf);
  if (scaling.skip) return;  // NOTE [overflow skip] (checks.h)

  // ---- per-tensor coefficients, in double as torch.optim computes them from Python floats
  cpu::AdamArgs a;
  a.tensors.resize(n);
  a.offsets = numel_offsets(params);
  a.dtype = dtype;
  a.grad_dtype = grad_dtype;
  a.mode = low.mode;
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.amsgrad = amsgrad;
  a.maximize = maximize;
  a.decoupled_weight_decay = decoupled_weight_decay;
  a.has_grad_mult = scaling.has_mult;
  a.grad_mult = scaling.mult;
  for (size_t i = 0; i < n; ++i) {
    const double step = steps[i] + 1;
    cpu::AdamTensor& t = a.tensors[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    t.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    t.master = low.master(i);
    t.compensation = low.compensation(i);
    t.step_size = lr / (1 - std::pow(beta1, step));
    t.bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, step));
  }

  PYEFF_ISA_SELECT(adam_kernel)(a);

  advance_steps(state_steps, steps);
  bump_versions({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, compensations});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  m.def(
      "adam_step_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor(f!)[] master_params, "
      "Tensor(g!)[] compensations, *, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool amsgrad, bool maximize, bool decoupled_weight_decay, Tensor? grad_mult=None, "
      "Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("adam_step_cpu", &adam_step_cpu); }

}  // namespace pyeff
