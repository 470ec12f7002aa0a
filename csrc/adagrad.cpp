// pyeff::adagrad_step_cpu: input checks and registration of the CPU Adagrad kernel
// (csrc/cpu/adagrad_kernel.cpp). The contract and the reference live in pyeff/ops/adagrad.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/adagrad_kernel.h"

namespace pyeff {
namespace {

constexpr const char* kOp = "adagrad_step";

// A sparse gradient, coalesced, and where each of its rows lands in the parameter
// (NOTE [sparse Adagrad rows]); every index is checked against the parameter's shape.
struct SparseRows {
  at::Tensor values;  // [nnz, dense dims...], contiguous
  std::vector<int64_t> row_offsets;
  int64_t row_numel = 0;
};

SparseRows sparse_rows(size_t i, const at::Tensor& grad, const at::Tensor& param, c10::ScalarType grad_dtype,
                       double weight_decay) {
  TORCH_CHECK(weight_decay == 0, kOp, ": weight_decay option is not compatible with sparse gradients");
  TORCH_CHECK(grad.layout() == at::kSparse, kOp, ": expected grads[", i, "] to be dense or sparse COO, got ",
              grad.layout());
  TORCH_CHECK(grad.device() == param.device(), kOp, ": expected grads[", i, "] on ", param.device(),
              " like its parameter, got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == grad_dtype, kOp, ": expected grads[", i, "] to be ", grad_dtype, ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.sizes() == param.sizes(), kOp, ": expected grads[", i, "] of shape ", param.sizes(),
              " like its parameter, got ", grad.sizes());
  TORCH_CHECK(param.is_contiguous(), kOp, ": params[", i, "] has a sparse gradient and must be contiguous");
  TORCH_CHECK(grad._indices().scalar_type() == at::kLong, kOp, ": expected the indices of grads[", i,
              "] to be int64, got ", grad._indices().scalar_type());
  // Indices first (torch builds sparse tensors without checking them, and coalescing an index outside
  // the shape is undefined), then coalesce: the update is non-linear, so repeated indices must be
  // summed first, as torch.optim.Adagrad does.
  const int64_t sparse_dim = grad.sparse_dim();
  {
    const at::Tensor indices = grad._indices();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    const int64_t s_dim = indices.stride(0), s_nnz = indices.stride(1), nnz = grad._nnz();
    for (int64_t d = 0; d < sparse_dim; ++d) {
      for (int64_t r = 0; r < nnz; ++r) {
        const int64_t k = idx[d * s_dim + r * s_nnz];
        TORCH_CHECK(k >= 0 && k < param.size(d), kOp, ": grads[", i, "] has index ", k, " in dimension ", d,
                    ", outside its parameter's size ", param.size(d));
      }
    }
  }
  const at::Tensor g = grad.is_coalesced() ? grad : grad.coalesce();
  SparseRows out;
  out.values = g._values().contiguous();
  const at::Tensor indices = g._indices();
  const int64_t nnz = g._nnz();
  out.row_numel = nnz == 0 ? 0 : out.values.numel() / nnz;
  out.row_offsets.assign(nnz, 0);
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const int64_t s_dim = indices.stride(0), s_nnz = indices.stride(1);
  for (int64_t d = 0; d < sparse_dim; ++d) {
    for (int64_t r = 0; r < nnz; ++r) out.row_offsets[r] += idx[d * s_dim + r * s_nnz] * param.stride(d);
  }
  return out;
}

void adagrad_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                      at::TensorList state_steps, at::TensorList master_params, at::TensorList compensations,
                      double lr, double lr_decay, double weight_decay, double eps, bool maximize,
                      const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf) {
  // ---- checks: nothing is written before all of them pass
  const size_t n = params.size();
  check_length(kOp, "grads", grads, n);
  check_length(kOp, "state_sums", state_sums, n);
  check_length(kOp, "state_steps", state_steps, n);
  const LowPrecisionState low(kOp, params, master_params, compensations);
  if (n == 0) return;

  const auto dtype = params[0].scalar_type();
  const auto grad_dtype = grads[0].scalar_type();
  check_optimizer_dtypes(kOp, dtype, grad_dtype);
  const auto state_dtype = low.state_dtype(dtype);
  const auto cpu = c10::DeviceType::CPU;
  std::vector<double> steps(n);
  std::vector<SparseRows> sparse(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    check_same_layout(kOp, "params", i, p, p, dtype, cpu);
    if (grads[i].is_sparse()) {
      sparse[i] = sparse_rows(i, grads[i], p, grad_dtype, weight_decay);
    } else {
      check_same_layout(kOp, "grads", i, grads[i], p, grad_dtype, cpu);
    }
    check_same_layout(kOp, "state_sums", i, state_sums[i], p, state_dtype, cpu);
    low.check(kOp, i, p, dtype);
    steps[i] = host_scalar(kOp, "state_steps", state_steps[i]);
  }
  const GradScaling scaling = grad_scaling(kOp, grad_mult, found_inf);
  if (scaling.skip) return;  // NOTE [overflow skip] (checks.h)

  // ---- per-tensor coefficients, in double as torch.optim computes them from Python floats
  cpu::AdagradArgs a;
  a.tensors.resize(n);
  a.offsets.assign(n + 1, 0);
  a.dtype = dtype;
  a.grad_dtype = grad_dtype;
  a.mode = low.mode;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.maximize = maximize;
  a.has_grad_mult = scaling.has_mult;
  a.grad_mult = scaling.mult;
  for (size_t i = 0; i < n; ++i) {
    const double step = steps[i] + 1;
    cpu::AdagradTensor& t = a.tensors[i];
    t.param = params[i].data_ptr();
    t.sum = state_sums[i].data_ptr();
    t.master = low.master(i);
    t.compensation = low.compensation(i);
    t.clr = lr / (1 + (step - 1) * lr_decay);
    int64_t work = params[i].numel();
    if (sparse[i].values.defined()) {
      t.grad = sparse[i].values.const_data_ptr();
      t.row_offsets = sparse[i].row_offsets.data();
      t.row_numel = sparse[i].row_numel;
      work = sparse[i].values.numel();
    } else {
      t.grad = grads[i].const_data_ptr();
    }
    a.offsets[i + 1] = a.offsets[i] + work;
  }

  PYEFF_ISA_SELECT(adagrad_kernel)(a);

  advance_steps(state_steps, steps);
  bump_versions({params, state_sums, state_steps, master_params, compensations});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  m.def(
      "adagrad_step_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor(c!)[] state_steps, "
      "Tensor(d!)[] master_params, Tensor(e!)[] compensations, *, float lr, float lr_decay, float weight_decay, "
      "float eps, bool maximize, Tensor? grad_mult=None, Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("adagrad_step_cpu", &adagrad_step_cpu); }

// A sparse gradient in the list makes the dispatcher pick the SparseCPU key; same kernel.
TORCH_LIBRARY_IMPL(pyeff, SparseCPU, m) { m.impl("adagrad_step_cpu", &adagrad_step_cpu); }

}  // namespace pyeff
