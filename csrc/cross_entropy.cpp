// pyeff::cross_entropy_rows_cpu: input checks and registration of the softmax cross-entropy kernel
// (csrc/cpu/cross_entropy_kernel.cpp): per-row losses and their gradient times a given scale. The
// reduction and its total weight are computed once, in pyeff/ops/cross_entropy.py (the contract and
// reference), for every backend; pyeff/ops/linear_cross_entropy.py calls this op chunk by chunk.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cross_entropy_kernel.h"

namespace pyeff {
namespace {

void check_logits_target(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": expected logits on the CPU, got ", logits.device());
  check_floating(op, logits.scalar_type(), "logits");
  TORCH_CHECK(logits.dim() == 2, op, ": expected logits of shape (rows, classes), got ", logits.sizes());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, op,
              ": expected logits with contiguous columns (stride 1), got strides ", logits.strides());
  TORCH_CHECK(target.device().is_cpu(), op, ": expected target on the CPU, got ", target.device());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": expected target to be int64, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": expected target of shape (",
              logits.size(0), ",) like the rows of logits, got ", target.sizes());
}

// The class weights as a contiguous opmath tensor (undefined without weights); `sum` gets W.
at::Tensor class_weights(const char* op, const std::optional<at::Tensor>& weight, const at::Tensor& logits,
                         double& sum) {
  const int64_t classes = logits.size(1);
  sum = static_cast<double>(classes);
  if (!weight.has_value()) return at::Tensor();
  const auto& w = *weight;
  TORCH_CHECK(w.device().is_cpu(), op, ": expected weight on the CPU, got ", w.device());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == classes, op, ": expected weight of shape (", classes,
              ",), one per class, got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == logits.scalar_type(), op, ": expected weight to be ", logits.scalar_type(),
              " like logits, got ", w.scalar_type());
  auto out = w.to(opmath_type(w.scalar_type())).contiguous();
  sum = 0;
  if (out.scalar_type() == at::kDouble) {
    for (int64_t c = 0; c < classes; ++c) sum += out.const_data_ptr<double>()[c];
  } else {
    for (int64_t c = 0; c < classes; ++c) sum += out.const_data_ptr<float>()[c];
  }
  return out;
}

// Every target is a class or ignore_index (IndexError otherwise, as torch): the kernel indexes with
// them.
void check_targets(const at::Tensor& target, int64_t classes, int64_t ignore_index) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < target.numel(); ++r) {
    const int64_t v = t[r];
    TORCH_CHECK_INDEX(v == ignore_index || (v >= 0 && v < classes), "Target ", v, " is out of bounds.");
  }
}

// grad: shaped like logits, of logits' dtype or float32 (for bfloat16/float16 logits), columns
// contiguous, rows not overlapping; either logits itself (in place) or disjoint from it.
void check_grad(const char* op, const at::Tensor& g, const at::Tensor& logits) {
  const auto dt = logits.scalar_type();
  TORCH_CHECK(g.device().is_cpu(), op, ": expected grad on the CPU, got ", g.device());
  TORCH_CHECK(g.scalar_type() == dt || (g.scalar_type() == at::kFloat && dt != at::kDouble), op,
              ": expected grad to be ", dt, dt != at::kDouble ? " or Float" : "", " like logits, got ",
              g.scalar_type());
  TORCH_CHECK(g.sizes() == logits.sizes(), op, ": expected grad of shape ", logits.sizes(), ", got ", g.sizes());
  const int64_t classes = g.size(1);
  TORCH_CHECK(classes <= 1 || g.stride(1) == 1, op, ": expected grad with contiguous columns (stride 1), got strides ",
              g.strides());
  TORCH_CHECK(g.size(0) <= 1 || g.stride(0) >= classes, op, ": expected grad rows not to overlap, got strides ",
              g.strides());
  if (g.numel() == 0 || logits.numel() == 0) return;
  const bool same = g.data_ptr() == logits.data_ptr() && g.scalar_type() == dt && g.strides() == logits.strides();
  auto span = [](const at::Tensor& t) {
    const char* lo = static_cast<const char*>(t.const_data_ptr());
    return std::make_pair(lo, lo + ((t.size(0) - 1) * t.stride(0) + t.size(1)) * t.element_size());
  };
  const auto [g_lo, g_hi] = span(g);
  const auto [x_lo, x_hi] = span(logits);
  TORCH_CHECK(same || g_hi <= x_lo || x_hi <= g_lo, op,
              ": grad must be either logits itself (in place) or not share memory with it");
}

void check_label_smoothing(const char* op, double label_smoothing) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": expected label_smoothing between 0.0 and 1.0, got ", label_smoothing);
}

cpu::CrossEntropyArgs make_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& w,
                                double weight_sum, int64_t ignore_index, double label_smoothing, double grad_scale,
                                const at::Tensor& row_losses, const std::optional<at::Tensor>& grad) {
  cpu::CrossEntropyArgs a;
  a.logits = logits.const_data_ptr();
  a.dtype = logits.scalar_type();
  a.logits_row_stride = logits.stride(0);
  a.target = target.const_data_ptr<int64_t>();
  a.class_weight = w.defined() ? w.const_data_ptr() : nullptr;
  a.weight_sum = weight_sum;
  a.rows = logits.size(0);
  a.classes = logits.size(1);
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.grad_scale = grad_scale;
  a.row_losses = row_losses.data_ptr();
  a.grad = grad.has_value() ? grad->data_ptr() : nullptr;
  a.grad_dtype = grad.has_value() ? grad->scalar_type() : a.dtype;
  a.grad_row_stride = grad.has_value() ? grad->stride(0) : 0;
  return a;
}

// One chunk of rows: per-row losses (opmath dtype, unreduced) and the gradient times grad_scale,
// possibly in place over logits, or as float32 for bfloat16/float16 logits.
void cross_entropy_rows_cpu(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            int64_t ignore_index, double label_smoothing, double grad_scale,
                            const at::Tensor& row_losses, const std::optional<at::Tensor>& grad) {
  constexpr const char* op = "cross_entropy_rows";
  check_logits_target(op, logits, target);
  check_label_smoothing(op, label_smoothing);
  const auto acc = opmath_type(logits.scalar_type());
  TORCH_CHECK(row_losses.device().is_cpu() && row_losses.scalar_type() == acc && row_losses.dim() == 1 &&
                  row_losses.size(0) == logits.size(0) && row_losses.is_contiguous(),
              op, ": expected row_losses to be a contiguous ", acc, " CPU tensor of shape (", logits.size(0),
              ",), got ", row_losses.scalar_type(), " of shape ", row_losses.sizes(), " on ", row_losses.device());
  if (grad.has_value()) check_grad(op, *grad, logits);
  const auto t = target.contiguous();
  double weight_sum = 0;
  const auto w = class_weights(op, weight, logits, weight_sum);
  check_targets(t, logits.size(1), ignore_index);

  PYEFF_ISA_SELECT(cross_entropy_kernel)(
      make_args(logits, t, w, weight_sum, ignore_index, label_smoothing, grad_scale, row_losses, grad));
  bump_versions({at::TensorList(row_losses)});
  if (grad.has_value()) bump_versions({at::TensorList(*grad)});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  // `grad` may be `logits` itself (in place); callers pass their own scratch logits only.
  m.def("cross_entropy_rows_cpu(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing, float grad_scale, Tensor(a!) row_losses, Tensor(b!)? grad) -> ()");
}

TORCH_LIBRARY_IMPL(pyeff, CPU, m) {
  m.impl("cross_entropy_rows_cpu", &cross_entropy_rows_cpu);
}

}  // namespace pyeff
