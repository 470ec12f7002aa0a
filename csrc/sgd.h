#pragma once
// sgd_step's input checks, shared by its CPU (csrc/sgd.cpp) and CUDA (csrc/cuda/sgd.cu)
// registrations: everything that can fail, before anything is written. The schema is the
// reference's (pyeff/ops/sgd.py; NOTE [one way to reach a kernel] in pyeff/ops/_registry.py).
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include "checks.h"

namespace pyeff {

inline OptimizerInputs check_sgd_step(const char* op, at::TensorList params, at::TensorList grads,
                                     at::TensorList momentum_buffers, const c10::List<bool>& is_first_step,
                                     at::TensorList master_params, at::TensorList compensations, double momentum,
                                     const std::optional<at::Tensor>& grad_mult,
                                     const std::optional<at::Tensor>& found_inf,
                                     const std::optional<at::Tensor>& lr_tensor) {
  const size_t with_momentum = momentum != 0 ? params.size() : 0;
  check_length(op, "momentum_buffers", momentum_buffers, with_momentum);
  TORCH_CHECK(is_first_step.size() == with_momentum, op, ": expected is_first_step to hold ", with_momentum,
              " flags (one per parameter with momentum, none without), got ", is_first_step.size());
  return check_optimizer_step(
      op, params, grads, std::nullopt, master_params, compensations, {"momentum_buffers", {}, {}}, grad_mult,
      found_inf, lr_tensor,
      [&](size_t i, const at::Tensor& p, c10::ScalarType grad_dtype) {
        check_same_layout(op, "grads", i, grads[i], p, grad_dtype, p.device().type());
      },
      [&](size_t i, const at::Tensor& p, const StateFormat& state) {  // the default format: no compressed state
        if (with_momentum) check_same_layout(op, "momentum_buffers", i, momentum_buffers[i], p, state.moment_dtype,
                                             p.device().type());
      });
}

}  // namespace pyeff
