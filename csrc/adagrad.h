#pragma once
// adagrad_step's input checks, shared by its CPU (csrc/adagrad.cpp) and CUDA (csrc/cuda/adagrad.cu)
// registrations: everything that can fail without reading a device's memory, before anything is
// written. The schema is the reference's (pyeff/ops/adagrad.py).
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "state_codec.h"

namespace pyeff {

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

inline OptimizerInputs check_adagrad_step(const char* op, at::TensorList params, at::TensorList grads,
                                         at::TensorList state_sums, at::TensorList state_steps,
                                         at::TensorList master_params, at::TensorList compensations,
                                         at::TensorList state_sum_absmaxes, at::IntArrayRef rng_seeds,
                                         double weight_decay, const std::optional<at::Tensor>& grad_mult,
                                         const std::optional<at::Tensor>& found_inf,
                                         const std::optional<at::Tensor>& lr_tensor) {
  const size_t n = params.size();
  check_length(op, "state_sums", state_sums, n);
  // NOTE [compressed optimizer state]: int8 codes of the sums come with their blocks' absmax.
  const bool coded = n > 0 && (state_sums[0].scalar_type() == at::kChar || state_sums[0].scalar_type() == at::kByte);
  check_length(op, "state_sum_absmaxes", state_sum_absmaxes, coded ? n : 0);
  return check_optimizer_step(
      op, params, grads, state_steps, master_params, compensations, {"state_sums", state_sums, rng_seeds}, grad_mult,
      found_inf, lr_tensor,
      [&](size_t i, const at::Tensor& p, c10::ScalarType grad_dtype) {
        if (grads[i].is_sparse()) {
          check_sparse_grad(op, i, grads[i], p, grad_dtype, weight_decay);
          TORCH_CHECK(!coded, op, ": grads[", i, "] is sparse; int8 block codes of `state_sums` take dense gradients "
                      "only");
        } else {
          check_same_layout(op, "grads", i, grads[i], p, grad_dtype, p.device().type());
        }
      },
      [&](size_t i, const at::Tensor& p, const StateFormat& state) {
        check_same_layout(op, "state_sums", i, state_sums[i], p, state.dtype_of(false), p.device().type());
        if (state.quantized) check_absmax(op, "state_sum_absmaxes", i, state_sum_absmaxes[i], p, kQuantBlock);
      });
}

}  // namespace pyeff
