#pragma once
// grad_stats's input checks, shared by its CPU (csrc/grad_stats.cpp) and CUDA (csrc/cuda/grad_stats.cu)
// registrations. Contract and reference: pyeff/ops/grad_stats.py.
#include <ATen/core/Tensor.h>

#include "checks.h"

namespace pyeff {

inline void check_grad_stats(const char* op, at::TensorList grads, const at::Tensor& out) {
  check_scalar(op, "out", out, out.device(), false, 2);
  TORCH_CHECK(out.is_contiguous(), op, ": expected `out` to be contiguous");
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    TORCH_CHECK(g.device() == out.device(), op, ": expected grads[", i, "] on ", out.device(), ", got ", g.device());
    TORCH_CHECK(!g.is_sparse(), op, ": grads[", i, "] is sparse; pass its values()");
    check_floating(op, g.scalar_type(), "grads[", i, "]");
    TORCH_CHECK(g.is_non_overlapping_and_dense(), op, ": expected grads[", i, "] to be dense");
  }
}

}  // namespace pyeff
