#pragma once
// adam_step's input checks, shared by its CPU (csrc/adam.cpp) and CUDA (csrc/cuda/adam.cu)
// registrations: everything that can fail, before anything is written. The schema is the reference's
// (pyeff/ops/adam.py; NOTE [one way to reach a kernel] in pyeff/ops/_registry.py).
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "state_codec.h"

namespace pyeff {

inline OptimizerInputs check_adam_step(const char* op, at::TensorList params, at::TensorList grads,
                                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                      at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                                      at::TensorList master_params, at::TensorList compensations,
                                      at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sq_absmaxes,
                                      at::TensorList max_exp_avg_sq_absmaxes, at::IntArrayRef rng_seeds,
                                      bool amsgrad, const std::optional<at::Tensor>& grad_mult,
                                      const std::optional<at::Tensor>& found_inf,
                                      const std::optional<at::Tensor>& lr_tensor) {
  const size_t n = params.size();
  check_length(op, "exp_avgs", exp_avgs, n);
  check_length(op, "exp_avg_sqs", exp_avg_sqs, n);
  check_length(op, "max_exp_avg_sqs", max_exp_avg_sqs, amsgrad ? n : 0);
  // NOTE [compressed optimizer state]: int8 codes of each moment come with their blocks' absmax.
  const bool coded = n > 0 && (exp_avgs[0].scalar_type() == at::kChar || exp_avgs[0].scalar_type() == at::kByte);
  check_length(op, "exp_avg_absmaxes", exp_avg_absmaxes, coded ? n : 0);
  check_length(op, "exp_avg_sq_absmaxes", exp_avg_sq_absmaxes, coded ? n : 0);
  check_length(op, "max_exp_avg_sq_absmaxes", max_exp_avg_sq_absmaxes, coded && amsgrad ? n : 0);
  return check_optimizer_step(
      op, params, grads, state_steps, master_params, compensations, {"exp_avgs", exp_avgs, rng_seeds}, grad_mult,
      found_inf, lr_tensor,
      [&](size_t i, const at::Tensor& p, c10::ScalarType grad_dtype) {
        check_same_layout(op, "grads", i, grads[i], p, grad_dtype, p.device().type());
      },
      [&](size_t i, const at::Tensor& p, const StateFormat& state) {
        const auto device = p.device().type();
        check_same_layout(op, "exp_avgs", i, exp_avgs[i], p, state.dtype_of(true), device);
        check_same_layout(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, state.dtype_of(false), device);
        if (amsgrad) check_same_layout(op, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], p, state.dtype_of(false), device);
        if (state.quantized) {
          check_absmax(op, "exp_avg_absmaxes", i, exp_avg_absmaxes[i], p, kQuantBlock);
          check_absmax(op, "exp_avg_sq_absmaxes", i, exp_avg_sq_absmaxes[i], p, kQuantBlock);
          if (amsgrad) check_absmax(op, "max_exp_avg_sq_absmaxes", i, max_exp_avg_sq_absmaxes[i], p, kQuantBlock);
        }
      });
}

}  // namespace pyeff
