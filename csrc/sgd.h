#pragma once
// sgd_step's input checks, shared by its CPU (csrc/sgd.cpp) and CUDA (csrc/cuda/sgd.cu)
// registrations: everything that can fail, before anything is written. The schema is the
// reference's (pyeff/ops/sgd.py; NOTE [one way to reach a kernel] in pyeff/ops/_registry.py).
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include "checks.h"

namespace pyeff {

struct SgdInputs {
  c10::ScalarType dtype, grad_dtype;
  LowPrecisionState low;
};

inline SgdInputs check_sgd_step(const char* op, at::TensorList params, at::TensorList grads,
                                at::TensorList momentum_buffers, const c10::List<bool>& is_first_step,
                                at::TensorList master_params, at::TensorList compensations, double momentum,
                                const std::optional<at::Tensor>& grad_mult,
                                const std::optional<at::Tensor>& found_inf,
                                const std::optional<at::Tensor>& lr_tensor) {
  const size_t n = params.size();
  const size_t with_momentum = momentum != 0 ? n : 0;
  check_length(op, "grads", grads, n);
  check_length(op, "momentum_buffers", momentum_buffers, with_momentum);
  TORCH_CHECK(is_first_step.size() == with_momentum, op, ": expected is_first_step to hold ", with_momentum,
              " flags (one per parameter with momentum, none without), got ", is_first_step.size());
  SgdInputs in{at::kFloat, at::kFloat, LowPrecisionState(op, params, master_params, compensations)};
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
    if (with_momentum) check_same_layout(op, "momentum_buffers", i, momentum_buffers[i], p, state_dtype, device.type());
    in.low.check(op, i, p, in.dtype);
  }
  check_controls(op, device, grad_mult, found_inf, lr_tensor);
  return in;
}

}  // namespace pyeff
