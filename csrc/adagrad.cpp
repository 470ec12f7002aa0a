// adagrad_step's CPU backend (csrc/cpu/adagrad_kernel.cpp): checks (csrc/adagrad.h), the sparse
// rows and host-side scalars, and registration as torch.ops.pyeff.adagrad_step.cpu. Contract and
// reference: pyeff/ops/adagrad.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "adagrad.h"
#include "cpu/adagrad_kernel.h"
#include "op_call.h"

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

// The op's checks (csrc/adagrad.h) and, for CPU tensors, the indices of the sparse gradients, read on
// the host: the two CPU entry points (the kernel, and the checks before a Triton launch) share them.
OptimizerInputs check_on_host(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                              at::TensorList state_steps, at::TensorList master_params, at::TensorList compensations,
                              at::TensorList state_sum_absmaxes, at::IntArrayRef rng_seeds, double weight_decay,
                              const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf,
                              const std::optional<at::Tensor>& lr_tensor) {
  const OptimizerInputs in =
      check_adagrad_step(kOp, params, grads, state_sums, state_steps, master_params, compensations,
                         state_sum_absmaxes, rng_seeds, weight_decay, grad_mult, found_inf, lr_tensor);
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].is_sparse() && grads[i].device().is_cpu()) check_sparse_indices_on_host(kOp, i, grads[i], params[i]);
  }
  return in;
}

// Coalesces (indices already checked: coalescing one outside the shape is undefined) and lays out
// the rows. The update is non-linear, so repeated indices are summed first, as torch.optim.Adagrad
// does.
SparseRows sparse_rows(const at::Tensor& grad, const at::Tensor& param) {
  const int64_t sparse_dim = grad.sparse_dim();
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
                      at::TensorList state_sum_absmaxes, at::IntArrayRef rng_seeds, double lr, double lr_decay,
                      double weight_decay, double eps, bool maximize, const std::optional<at::Tensor>& grad_mult,
                      const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor) {
  const OptimizerInputs in = check_on_host(params, grads, state_sums, state_steps, master_params, compensations,
                                           state_sum_absmaxes, rng_seeds, weight_decay, grad_mult, found_inf,
                                           lr_tensor);
  const size_t n = params.size();
  if (n == 0) return;
  TORCH_CHECK(params[0].device().is_cpu(), kOp, ": the cpu backend takes CPU tensors, got ", params[0].device());
  std::vector<SparseRows> sparse(n);
  for (size_t i = 0; i < n; ++i) {
    if (grads[i].is_sparse()) sparse[i] = sparse_rows(grads[i], params[i]);
  }
  const GradScaling scaling = grad_scaling(kOp, grad_mult, found_inf);
  if (scaling.skip) return;  // NOTE [overflow skip] (checks.h)

  cpu::AdagradArgs a;
  a.tensors.resize(n);
  a.offsets.assign(n + 1, 0);
  a.dtype = in.dtype;
  a.grad_dtype = in.grad_dtype;
  a.mode = in.low.mode;
  a.sum_dtype = in.state.moment_dtype;
  a.stochastic = in.state.stochastic;
  a.hyper = {lr_decay, eps, weight_decay, maximize, scaling.has_mult};
  a.lr = lr_tensor ? host_scalar(kOp, "lr_tensor", *lr_tensor) : lr;
  a.grad_mult = scaling.mult;
  std::vector<double> steps(n);
  for (size_t i = 0; i < n; ++i) {
    steps[i] = host_scalar(kOp, "state_steps", state_steps[i]);
    cpu::AdagradTensor& t = a.tensors[i];
    t.param = params[i].data_ptr();
    t.sum = state_sums[i].data_ptr();
    t.master = in.low.master(i);
    t.compensation = in.low.compensation(i);
    t.sum_absmax = in.state.quantized ? state_sum_absmaxes[i].data_ptr<float>() : nullptr;
    t.seed = rng_seeds.empty() ? 0 : rng_seeds[i];
    t.numel = params[i].numel();
    t.step = steps[i] + 1;
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
  bump_versions({params, state_sums, state_steps, master_params, compensations, state_sum_absmaxes});
}

// The checks alone, for the backends that write through raw addresses (Triton): adagrad_step.check.
void adagrad_step_check(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                        at::TensorList state_steps, at::TensorList master_params, at::TensorList compensations,
                        at::TensorList state_sum_absmaxes, at::IntArrayRef rng_seeds, double, double,
                        double weight_decay, double, bool, const std::optional<at::Tensor>& grad_mult,
                        const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor) {
  check_on_host(params, grads, state_sums, state_steps, master_params, compensations, state_sum_absmaxes, rng_seeds,
                weight_decay, grad_mult, found_inf, lr_tensor);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("adagrad_step.cpu", &adagrad_step_cpu); }
PYEFF_OP_CALL(adagrad_step, adagrad_step_cpu);  // NOTE [calling an op from Python]
TORCH_LIBRARY_IMPL(pyeff, CompositeExplicitAutograd, m) { m.impl("adagrad_step.check", &adagrad_step_check); }

// A sparse gradient in the list makes the dispatcher pick the SparseCPU key; same kernel.
TORCH_LIBRARY_IMPL(pyeff, SparseCPU, m) { m.impl("adagrad_step.cpu", &adagrad_step_cpu); }

}  // namespace pyeff
