// norm_forward / norm_backward's CPU backend: checks and registration (as torch.ops.pyeff.<op>.cpu) of the
// LayerNorm / RMSNorm kernels (csrc/cpu/norm_kernel.cpp). Contract and reference: pyeff/ops/norm.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cpu/norm_kernel.h"

namespace pyeff {
namespace {

constexpr const char* kFwd = "norm_forward";
constexpr const char* kBwd = "norm_backward";

void check_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": expected ", name, " to be 2-D (rows, normalized numel), got shape ", t.sizes());
  check_floating(op, t.scalar_type(), name);
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

// A tensor that must match `like` (the input) in shape, dtype and layout.
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": expected ", name, " to be ", like.scalar_type(),
              " like the input, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": expected ", name, " of shape ", like.sizes(),
              " like the input, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

// weight/bias: (cols,), the input's dtype or float32 (for bfloat16/float16 input). Returns the dtype
// the kernel reads parameters as (the opmath type when there are none).
c10::ScalarType check_params(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias) {
  const auto dt = x.scalar_type();
  std::optional<c10::ScalarType> param_dtype;
  for (const auto& [name, p] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!p->has_value()) continue;
    const auto& t = **p;
    TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": expected ", name, " of shape [", x.size(1),
                "] (the normalized numel), got ", t.sizes());
    check_param_dtype(op, name, t.scalar_type(), dt);
    TORCH_CHECK(!param_dtype || *param_dtype == t.scalar_type(), op, ": expected weight and bias of one dtype, got ",
                *param_dtype, " and ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
    param_dtype = t.scalar_type();
  }
  return param_dtype.value_or(opmath_type(dt));
}

void check_stat(const char* name, const at::Tensor& t, const at::Tensor& like) {
  const auto expected = opmath_type(like.scalar_type());
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == expected && t.dim() == 1 && t.size(0) == like.size(0) &&
                  t.is_contiguous(),
              kBwd, ": expected ", name, " to be a contiguous ", expected, " CPU tensor of shape [", like.size(0),
              "], got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  check_input(kFwd, "x", x);
  if (residual.has_value()) check_like(kFwd, "residual", *residual, x);
  TORCH_CHECK(!(rms && bias.has_value()), kFwd, ": `rms=True` takes no `bias`; RMSNorm has none");
  const auto param_dtype = check_params(kFwd, x, weight, bias);

  const auto rows = x.size(0);
  const auto opts = x.options();
  const auto stat_opts = opts.dtype(opmath_type(x.scalar_type()));
  auto y = at::empty_like(x);
  auto sum = residual.has_value() ? at::empty_like(x) : at::empty({0}, opts);
  auto mean = at::empty({rms ? 0 : rows}, stat_opts);
  auto rstd = at::empty({rows}, stat_opts);

  cpu::NormForwardArgs a;
  a.x = x.const_data_ptr();
  a.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;
  a.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  a.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.sum = residual.has_value() ? sum.data_ptr() : nullptr;
  a.mean = rms ? nullptr : mean.data_ptr();
  a.rstd = rstd.data_ptr();
  a.dtype = x.scalar_type();
  a.param_dtype = param_dtype;
  a.rows = rows;
  a.cols = x.size(1);
  a.eps = eps;
  a.rms = rms;
  PYEFF_ISA_SELECT(norm_forward_kernel)(a);
  return {y, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_cpu(
    const at::Tensor& dy, const std::optional<at::Tensor>& dsum, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, bool rms,
    bool weight_grad, bool bias_grad) {
  check_input(kBwd, "h", h);
  check_like(kBwd, "dy", dy, h);
  if (dsum.has_value()) check_like(kBwd, "dsum", *dsum, h);
  if (!rms) check_stat("mean", mean, h);
  check_stat("rstd", rstd, h);
  TORCH_CHECK(!(rms && bias_grad), kBwd, ": `rms=True` has no bias; pass `bias_grad=False`");
  const auto param_dtype = check_params(kBwd, h, weight, std::nullopt);
  TORCH_CHECK(weight.has_value() || !weight_grad, kBwd, ": `weight_grad=True` needs the `weight`");

  auto dx = at::empty_like(h);
  const auto popts = h.options().dtype(param_dtype);
  auto dweight = at::empty({weight_grad ? h.size(1) : 0}, popts);
  auto dbias = at::empty({bias_grad ? h.size(1) : 0}, popts);

  cpu::NormBackwardArgs a;
  a.dy = dy.const_data_ptr();
  a.dsum = dsum.has_value() ? dsum->const_data_ptr() : nullptr;
  a.h = h.const_data_ptr();
  a.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  a.mean = rms ? nullptr : mean.const_data_ptr();
  a.rstd = rstd.const_data_ptr();
  a.dx = dx.data_ptr();
  a.dweight = weight_grad ? dweight.data_ptr() : nullptr;
  a.dbias = bias_grad ? dbias.data_ptr() : nullptr;
  a.dtype = h.scalar_type();
  a.param_dtype = param_dtype;
  a.rows = h.size(0);
  a.cols = h.size(1);
  a.rms = rms;
  PYEFF_ISA_SELECT(norm_backward_kernel)(a);
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) {
  m.impl("norm_forward.cpu", &norm_forward_cpu);
  m.impl("norm_backward.cpu", &norm_backward_cpu);
}

}  // namespace pyeff
