// pyeff::grad_stats_cpu: checks and registration of the gradient statistics pass
// (csrc/cpu/grad_stats_kernel.cpp). Contract and reference: pyeff/ops/grad_stats.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/grad_stats_kernel.h"

namespace pyeff {
namespace {

constexpr const char* kOp = "grad_stats";

// Returns float32 [sum of squares, 1 if any element is inf/NaN else 0].
at::Tensor grad_stats_cpu(at::TensorList grads) {
  cpu::GradStatsArgs a;
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    TORCH_CHECK(g.device().is_cpu(), kOp, ": expected grads[", i, "] on the CPU, got ", g.device());
    TORCH_CHECK(!g.is_sparse(), kOp, ": grads[", i, "] is sparse; pass its values()");
    const auto dt = g.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, kOp,
                ": expected grads[", i, "] to be float32, float64, bfloat16 or float16, got ", dt);
    TORCH_CHECK(g.is_non_overlapping_and_dense(), kOp, ": expected grads[", i, "] to be dense");
    a.data.push_back(g.const_data_ptr());
    a.dtypes.push_back(dt);
  }
  a.offsets = numel_offsets(grads);
  const auto stats = PYEFF_ISA_SELECT(grad_stats_kernel)(a);
  auto out = at::empty({2}, at::TensorOptions().dtype(at::kFloat));
  out.data_ptr<float>()[0] = static_cast<float>(stats.sum_of_squares);
  out.data_ptr<float>()[1] = stats.nonfinite ? 1.f : 0.f;
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyeff, m) { m.def("grad_stats_cpu(Tensor[] grads) -> Tensor"); }

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("grad_stats_cpu", &grad_stats_cpu); }

}  // namespace pyeff
