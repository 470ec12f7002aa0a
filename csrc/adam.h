#pragma once
// adam_step's input checks, shared by its CPU (csrc/adam.cpp) and CUDA (csrc/cuda/adam.cu)
// registrations: everything that can fail, before anything is written. The schema is the reference's
// (pyeff/ops/adam.py; NOTE [one way to reach a kernel] in pyeff/ops/_registry.py).
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "state_codec.h"

namespace pyeff {

struct AdamInputs {
  c10::ScalarType dtype, grad_dtype;
  LowPrecisionState low;
  StateFormat state;
};

inline AdamInputs check_adam_step(const char* op, at::TensorList params, at::TensorList grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                                  at::TensorList master_params, at::TensorList compensations,
                                  at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sq_absmaxes,
                                  at::TensorList max_exp_avg_sq_absmaxes, at::IntArrayRef rng_seeds, bool amsgrad,
                                  const std::optional<at::Tensor>& grad_mult,
                                  const std::optional<at::Tensor>& found_inf,
                                  const std::optional<at::Tensor>& lr_tensor) {
  const size_t n = params.size();
  check_length(op, "grads", grads, n);
  check_length(op, "exp_avgs", exp_avgs, n);
  check_length(op, "exp_avg_sqs", exp_avg_sqs, n);
  check_length(op, "max_exp_avg_sqs", max_exp_avg_sqs, amsgrad ? n : 0);
  check_length(op, "state_steps", state_steps, n);
  AdamInputs in{at::kFloat, at::kFloat, LowPrecisionState(op, params, master_params, compensations), {}};
  if (n == 0) return in;
  in.dtype = params[0].scalar_type();
  in.grad_dtype = grads[0].scalar_type();
  check_optimizer_dtypes(op, in.dtype, in.grad_dtype);
  in.state = StateFormat(op, "exp_avgs", in.dtype, in.low, exp_avgs[0].scalar_type(), n, rng_seeds);
  const size_t coded = in.state.quantized ? n : 0;
  check_length(op, "exp_avg_absmaxes", exp_avg_absmaxes, coded);
  check_length(op, "exp_avg_sq_absmaxes", exp_avg_sq_absmaxes, coded);
  check_length(op, "max_exp_avg_sq_absmaxes", max_exp_avg_sq_absmaxes, amsgrad ? coded : 0);
  const auto m_dtype = in.state.dtype_of(true), v_dtype = in.state.dtype_of(false);
  const auto device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    check_same_layout(op, "params", i, p, p, in.dtype, device.type());
    TORCH_CHECK(p.device() == device, op, ": expected params[", i, "] on ", device, " like params[0], got ",
                p.device());
    check_same_layout(op, "grads", i, grads[i], p, in.grad_dtype, device.type());
    check_same_layout(op, "exp_avgs", i, exp_avgs[i], p, m_dtype, device.type());
    check_same_layout(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, v_dtype, device.type());
    if (amsgrad) check_same_layout(op, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], p, v_dtype, device.type());
    if (coded != 0) {
      check_absmax(op, "exp_avg_absmaxes", i, exp_avg_absmaxes[i], p, kQuantBlock);
      check_absmax(op, "exp_avg_sq_absmaxes", i, exp_avg_sq_absmaxes[i], p, kQuantBlock);
      if (amsgrad) check_absmax(op, "max_exp_avg_sq_absmaxes", i, max_exp_avg_sq_absmaxes[i], p, kQuantBlock);
    }
    in.low.check(op, i, p, in.dtype);
    check_scalar(op, "state_steps[" + std::to_string(i) + "]", state_steps[i], device);
  }
  check_controls(op, device, grad_mult, found_inf, lr_tensor);
  return in;
}

}  // namespace pyeff
