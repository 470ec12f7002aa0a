// adam_step's CPU backend (csrc/cpu/adam_kernel.cpp): checks (csrc/adam.h), the host-side scalars,
// and registration as torch.ops.pyeff.adam_step.cpu. Contract and reference: pyeff/ops/adam.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "adam.h"
#include "cpu/adam_kernel.h"
#include "op_call.h"

namespace pyeff {
namespace {

constexpr const char* kOp = "adam_step";

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                   at::TensorList master_params, at::TensorList compensations, at::TensorList exp_avg_absmaxes,
                   at::TensorList exp_avg_sq_absmaxes, at::TensorList max_exp_avg_sq_absmaxes,
                   at::IntArrayRef rng_seeds, double lr, double beta1, double beta2, double eps, double weight_decay,
                   bool amsgrad, bool maximize, bool decoupled_weight_decay,
                   const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& lr_tensor) {
  const OptimizerInputs in =
      check_adam_step(kOp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
                      compensations, exp_avg_absmaxes, exp_avg_sq_absmaxes, max_exp_avg_sq_absmaxes, rng_seeds,
                      amsgrad, grad_mult, found_inf, lr_tensor);
  const size_t n = params.size();
  if (n == 0) return;
  TORCH_CHECK(params[0].device().is_cpu(), kOp, ": the cpu backend takes CPU tensors, got ", params[0].device());
  const GradScaling scaling = grad_scaling(kOp, grad_mult, found_inf);
  if (scaling.skip) return;  // NOTE [overflow skip] (checks.h)

  cpu::AdamArgs a;
  a.tensors.resize(n);
  a.offsets = numel_offsets(params);
  a.dtype = in.dtype;
  a.grad_dtype = in.grad_dtype;
  a.mode = in.low.mode;
  a.moment_dtype = in.state.moment_dtype;
  a.stochastic = in.state.stochastic;
  a.hyper = {beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, scaling.has_mult};
  a.lr = lr_tensor ? host_scalar(kOp, "lr_tensor", *lr_tensor) : lr;
  a.grad_mult = scaling.mult;
  std::vector<double> steps(n);
  for (size_t i = 0; i < n; ++i) {
    steps[i] = host_scalar(kOp, "state_steps", state_steps[i]);
    cpu::AdamTensor& t = a.tensors[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    t.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    t.master = in.low.master(i);
    t.compensation = in.low.compensation(i);
    const bool coded = in.state.quantized;
    t.exp_avg_absmax = coded ? exp_avg_absmaxes[i].data_ptr<float>() : nullptr;
    t.exp_avg_sq_absmax = coded ? exp_avg_sq_absmaxes[i].data_ptr<float>() : nullptr;
    t.max_exp_avg_sq_absmax = coded && amsgrad ? max_exp_avg_sq_absmaxes[i].data_ptr<float>() : nullptr;
    t.seed = rng_seeds.empty() ? 0 : rng_seeds[i];
    t.numel = params[i].numel();
    t.step = steps[i] + 1;
  }

  PYEFF_ISA_SELECT(adam_kernel)(a);

  advance_steps(state_steps, steps);
  bump_versions({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, compensations,
                 exp_avg_absmaxes, exp_avg_sq_absmaxes, max_exp_avg_sq_absmaxes});
}

// The checks alone, for the backends that write through raw addresses (Triton): adam_step.check.
void adam_step_check(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                     at::TensorList master_params, at::TensorList compensations, at::TensorList exp_avg_absmaxes,
                     at::TensorList exp_avg_sq_absmaxes, at::TensorList max_exp_avg_sq_absmaxes,
                     at::IntArrayRef rng_seeds, double, double, double, double, double, bool amsgrad, bool, bool,
                     const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& lr_tensor) {
  check_adam_step(kOp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
                  compensations, exp_avg_absmaxes, exp_avg_sq_absmaxes, max_exp_avg_sq_absmaxes, rng_seeds, amsgrad,
                  grad_mult, found_inf, lr_tensor);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("adam_step.cpu", &adam_step_cpu); }
PYEFF_OP_CALL(adam_step, adam_step_cpu);  // NOTE [calling an op from Python]
TORCH_LIBRARY_IMPL(pyeff, CompositeExplicitAutograd, m) { m.impl("adam_step.check", &adam_step_check); }

}  // namespace pyeff
