#pragma once
// adam_step's input checks, shared by its CPU (csrc/adam.cpp) and CUDA (csrc/cuda/adam.cu)
// registrations: everything that can fail, before anything is written. The schema is the reference's
// (pyeff/ops/adam.py; NOTE [one way to reach a kernel] in pyeff/ops/_registry.py).
#include <ATen/core/Tensor.h>

#include "checks.h"

namespace pyeff {

struct AdamInputs {
  c10::ScalarType dtype, grad_dtype;
  LowPrecisionState low;
};

inline AdamInputs check_adam_step(const char* op, at::TensorList params, at::TensorList grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                                  at::TensorList master_params, at::TensorList compensations, bool amsgrad,
                                  const std::optional<at::Tensor>& grad_mult,
                                  const std::optional<at::Tensor>& found_inf,
                                  const std::optional<at::Tensor>& lr_tensor) {
  const size_t n = params.size();
  check_length(op, "grads", grads, n);
  check_length(op, "exp_avgs", exp_avgs, n);
  check_length(op, "exp_avg_sqs", exp_avg_sqs, n);
  check_length(op, "max_exp_avg_sqs", max_exp_avg_sqs, amsgrad ? n : 0);
  check_length(op, "state_steps", state_steps, n);
  AdamInputs in{at::kFloat, at::kFloat, LowPrecisionState(op, params, master_params, compensations)};
  if (n == 0) return in;
  in.dtype = params[0].scalar_type();
  in.grad_dtype = grads[0].scalar_type();
  check_optimizer_dtypes(op, in.dtype, in.grad_dtype);
  const auto state_dtype = in.low.state_dtype(in.dtype);
  const auto device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    check_same_layout(op, "params", i, p, p, in.dtype, device.type());
    TORCH_CHECK(p.device() == device, op, ": expected params[", i, "] on ", device, " like params[0], got ",
                p.device());
    check_same_layout(op, "grads", i, grads[i], p, in.grad_dtype, device.type());
    check_same_layout(op, "exp_avgs", i, exp_avgs[i], p, state_dtype, device.type());
    check_same_layout(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, state_dtype, device.type());
    if (amsgrad) check_same_layout(op, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], p, state_dtype, device.type());
    in.low.check(op, i, p, in.dtype);
    check_scalar(op, "state_steps[" + std::to_string(i) + "]", state_steps[i], device);
  }
  check_controls(op, device, grad_mult, found_inf, lr_tensor);
  return in;
}

}  // namespace pyeff
