// grad_stats's CPU backend (csrc/cpu/grad_stats_kernel.cpp): checks (csrc/grad_stats.h) and
// registration as torch.ops.pyeff.grad_stats.cpu. Contract and reference: pyeff/ops/grad_stats.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu/grad_stats_kernel.h"
#include "grad_stats.h"
#include "op_call.h"

namespace pyeff {
namespace {

constexpr const char* kOp = "grad_stats";

// Writes float32 [sum of squares, 1 if any element is inf/NaN else 0] into out.
void grad_stats_cpu(at::TensorList grads, const at::Tensor& out) {
  check_grad_stats(kOp, grads, out);
  TORCH_CHECK(out.device().is_cpu(), kOp, ": the cpu backend takes CPU tensors, got ", out.device());
  cpu::GradStatsArgs a;
  for (const auto& g : grads) {
    a.data.push_back(g.const_data_ptr());
    a.dtypes.push_back(g.scalar_type());
  }
  a.offsets = numel_offsets(grads);
  const auto stats = PYEFF_ISA_SELECT(grad_stats_kernel)(a);
  float* o = out.data_ptr<float>();
  o[0] = static_cast<float>(stats.sum_of_squares);
  o[1] = stats.nonfinite ? 1.f : 0.f;
  bump_versions({at::TensorList(out)});
}

void grad_stats_check(at::TensorList grads, const at::Tensor& out) { check_grad_stats(kOp, grads, out); }

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("grad_stats.cpu", &grad_stats_cpu); }
PYEFF_OP_CALL(grad_stats, grad_stats_cpu);  // NOTE [calling an op from Python]
TORCH_LIBRARY_IMPL(pyeff, CompositeExplicitAutograd, m) { m.impl("grad_stats.check", &grad_stats_check); }

}  // namespace pyeff
