// scale_grad_stats's CPU backend (csrc/cpu/scale_grad_stats_kernel.cpp): checks and registration as
// torch.ops.pyeff.scale_grad_stats.cpu. Contract and reference: pyeff/ops/scale_grad_stats.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/scale_grad_stats_kernel.h"
#include "op_call.h"

namespace pyeff {
namespace {

constexpr const char* kOp = "scale_grad_stats";

bool low_or_single(at::ScalarType dt) { return dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf; }

// dst = src * scale (dst may be src); writes float32 [sum of squares of dst, 1 if any inf/NaN else 0]
// into out.
void scale_grad_stats_cpu(const at::Tensor& src, const at::Tensor& dst, double scale, const at::Tensor& out) {
  check_scalar(kOp, "out", out, at::Device(at::kCPU), false, 2);
  TORCH_CHECK(out.is_contiguous(), kOp, ": expected `out` to be contiguous");
  TORCH_CHECK(src.device().is_cpu() && dst.device().is_cpu(), kOp, ": the cpu backend takes CPU tensors, got ",
              src.device(), " and ", dst.device());
  const auto s = src.scalar_type(), d = dst.scalar_type();
  TORCH_CHECK((low_or_single(s) && low_or_single(d)) || (s == at::kDouble && d == at::kDouble), kOp,
              ": expected src and dst to be float32, bfloat16 or float16 (or both float64), got ", s, " and ", d);
  TORCH_CHECK(src.numel() == dst.numel(), kOp, ": expected dst to have src's ", src.numel(), " elements, got ",
              dst.numel());
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous(), kOp, ": expected src and dst to be contiguous");
  TORCH_CHECK((src.data_ptr() == dst.data_ptr() && s == d) || !src.is_alias_of(dst), kOp,
              ": src and dst share storage without being the same elements");
  cpu::ScaleGradStatsArgs a{src.const_data_ptr(), dst.data_ptr(), s, d, src.numel(), scale};
  const auto stats = PYEFF_ISA_SELECT(scale_grad_stats_kernel)(a);
  float* o = out.data_ptr<float>();
  o[0] = static_cast<float>(stats.sum_of_squares);
  o[1] = stats.nonfinite ? 1.f : 0.f;
  bump_versions({at::TensorList(dst), at::TensorList(out)});
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("scale_grad_stats.cpu", &scale_grad_stats_cpu); }
PYEFF_OP_CALL(scale_grad_stats, scale_grad_stats_cpu);  // NOTE [calling an op from Python]

}  // namespace pyeff
