#pragma once
// adagrad_step's input checks, shared by its CPU (csrc/adagrad.cpp) and CUDA (csrc/cuda/adagrad.cu)
// registrations: everything that can fail without reading a device's memory, before anything is
// written. The schema is the reference's (pyeff/ops/adagrad.py).
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "state_codec.h"

namespace pyeff {

struct AdagradInputs {
  c10::ScalarType dtype, grad_dtype;
  LowPrecisionState low;
  StateFormat state;
};

// A sparse (COO) gradient: everything but its indices' values (NOTE [sparse Adagrad rows]).
inline void check_sparse_grad(const char* op, size_t i, const at::Tensor& grad, const at::Tensor& param,
                              c10::ScalarType grad_dtype, double weight_decay) {
  TORCH_CHECK(weight_decay == 0, op, ": weight_decay option is not compatible with sparse gradients");
  TORCH_CHECK(grad.layout() == at::kSparse, op, ": expected grads[", i, "] to be dense or sparse COO, got ",
              grad.layout());
  TORCH_CHECK(grad.device() == param.device(), op, ": expected grads[", i, "] on ", param.device(),
              " like its parameter, got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == grad_dtype, op, ": expected grads[", i, "] to be ", grad_dtype, ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.sizes() == param.sizes(), op, ": expected grads[", i, "] of shape ", param.sizes(),
              " like its parameter, got ", grad.sizes());
  TORCH_CHECK(param.is_contiguous(), op, ": params[", i, "] has a sparse gradient and must be contiguous");
  TORCH_CHECK(grad._indices().scalar_type() == at::kLong, op, ": expected the indices of grads[", i,
              "] to be int64, got ", grad._indices().scalar_type());
}

// A sparse gradient's indices against its parameter's shape, read on the host (torch builds sparse
// tensors without checking them): on the CPU only, where it costs no sync; the CUDA kernels assert.
inline void check_sparse_indices_on_host(const char* op, size_t i, const at::Tensor& grad, const at::Tensor& param) {
  const at::Tensor indices = grad._indices();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const int64_t s_dim = indices.stride(0), s_nnz = indices.stride(1), nnz = grad._nnz();
  for (int64_t d = 0; d < grad.sparse_dim(); ++d) {
    for (int64_t r = 0; r < nnz; ++r) {
      const int64_t k = idx[d * s_dim + r * s_nnz];
      TORCH_CHECK(k >= 0 && k < param.size(d), op, ": grads[", i, "] has index ", k, " in dimension ", d,
                  ", outside its parameter's size ", param.size(d));
    }
  }
}

inline AdagradInputs check_adagrad_step(const char* op, at::TensorList params, at::TensorList grads,
                                        at::TensorList state_sums, at::TensorList state_steps,
                                        at::TensorList master_params, at::TensorList compensations,
                                        at::TensorList state_sum_absmaxes, at::IntArrayRef rng_seeds,
                                        double weight_decay, const std::optional<at::Tensor>& grad_mult,
                                        const std::optional<at::Tensor>& found_inf,
                                        const std::optional<at::Tensor>& lr_tensor) {
  const size_t n = params.size();
  check_length(op, "grads", grads, n);
  check_length(op, "state_sums", state_sums, n);
  check_length(op, "state_steps", state_steps, n);
  AdagradInputs in{at::kFloat, at::kFloat, LowPrecisionState(op, params, master_params, compensations), {}};
  if (n == 0) return in;
  in.dtype = params[0].scalar_type();
  in.grad_dtype = grads[0].scalar_type();
  check_optimizer_dtypes(op, in.dtype, in.grad_dtype);
  in.state = StateFormat(op, "state_sums", in.dtype, in.low, state_sums[0].scalar_type(), n, rng_seeds);
  check_length(op, "state_sum_absmaxes", state_sum_absmaxes, in.state.quantized ? n : 0);
  const auto state_dtype = in.state.dtype_of(false);
  const auto device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    check_same_layout(op, "params", i, p, p, in.dtype, device.type());
    TORCH_CHECK(p.device() == device, op, ": expected params[", i, "] on ", device, " like params[0], got ",
                p.device());
    if (grads[i].is_sparse()) {
      check_sparse_grad(op, i, grads[i], p, in.grad_dtype, weight_decay);
      TORCH_CHECK(!in.state.quantized, op, ": grads[", i, "] is sparse; int8 block codes of `state_sums` take dense "
                  "gradients only");
    } else {
      check_same_layout(op, "grads", i, grads[i], p, in.grad_dtype, device.type());
    }
    check_same_layout(op, "state_sums", i, state_sums[i], p, state_dtype, device.type());
    if (in.state.quantized) check_absmax(op, "state_sum_absmaxes", i, state_sum_absmaxes[i], p, kQuantBlock);
    in.low.check(op, i, p, in.dtype);
    check_scalar(op, "state_steps[" + std::to_string(i) + "]", state_steps[i], device);
  }
  check_controls(op, device, grad_mult, found_inf, lr_tensor);
  return in;
}

}  // namespace pyeff
