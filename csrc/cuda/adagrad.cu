// adagrad_step's CUDA backend: one launch over every tensor of the call, dense gradients and the
// rows of coalesced sparse ones alike (NOTE [multi-tensor launch], NOTE [sparse Adagrad rows]), the
// update of csrc/adagrad_math.h per element, then one launch that advances the step counts;
// registration as torch.ops.pyeff.adagrad_step.cuda. Nothing is read on the host, but coalescing a
// sparse gradient (torch's coalesce() learns the number of unique rows, a sync) unless it is
// coalesced already. Contract and reference: pyeff/ops/adagrad.py; checks: csrc/adagrad.h.
#include <ATen/core/Tensor.h>

#include "adagrad.h"
#include "adagrad_math.h"
#include "cuda/optimizer.cuh"
#include "cuda/steps.cuh"

namespace pyeff::cuda {
namespace {

constexpr const char* kOp = "adagrad_step";
constexpr int kMaxSparseDims = 4;

struct AdagradEntry {
  void* param;
  const void* grad;    // dense gradient, or the coalesced values of a sparse one
  void* sum;
  float* master;       // MASTER only
  void* compensation;  // KAHAN only
  const void* step;    // the step count before this step
  int64_t numel;       // elements to update: the parameter's, or nnz x row_numel for a sparse gradient
  // A sparse gradient's rows (indices null for a dense one): row r of the values lands at element
  // sum_d indices[d][r] * strides[d] of the parameter and its state.
  const int64_t* indices;
  int64_t index_dim_stride, index_row_stride, row_numel;
  int sparse_dim;
  int64_t sizes[kMaxSparseDims], strides[kMaxSparseDims];
};

// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE.
template <typename P, typename G, PrecisionMode MODE>
struct AdagradChunk {
  using Acc = acc_t<P>;
  using S = state_t<P, MODE>;
  static constexpr int kW = kVec<P>;

  struct Ptrs {
    ParamAccess<P, MODE> param;
    const G* grad;
    S* sum;
  };

  // W consecutive elements: the parameter's (and its state's) from i, the gradient's from gi.
  template <int W, bool SPARSE>
  C10_DEVICE static void update(const Ptrs& q, int64_t i, int64_t gi, const AdagradHyper& h,
                                const AdagradCoef<Acc>& c) {
    Acc p[W], g[W], s[W], old[W];
    q.param.template load<W>(i, p);
    load<W>(q.grad, gi, g);
    load<W>(q.sum, i, s);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      old[k] = p[k];
      adagrad_math<SPARSE>(h, c, p[k], g[k], s[k]);
    }
    store<W>(q.sum, i, s);
    q.param.template store<W>(i, p, old);
  }

  C10_DEVICE void operator()(const AdagradEntry& e, int64_t begin, int64_t end, const AdagradHyper& h,
                             const StepScalars& s) const {
    if (s.skip()) return;
    const auto c = adagrad_coef<Acc, Acc>(h, s.learning_rate(), s.step(e.step), s.multiplier<Acc>());
    const Ptrs q{{static_cast<P*>(e.param), e.master, static_cast<P*>(e.compensation)},
                 static_cast<const G*>(e.grad),
                 static_cast<S*>(e.sum)};
    if (e.indices != nullptr) {  // a sparse gradient: element j of the values, row by row
      for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
        const int64_t row = j / e.row_numel;
        int64_t at = j - row * e.row_numel;
        for (int d = 0; d < e.sparse_dim; ++d) {
          const int64_t index = e.indices[d * e.index_dim_stride + row * e.index_row_stride];
          PYEFF_DEVICE_ASSERT(index >= 0 && index < e.sizes[d]);  // torch does not check indices
          at += index * e.strides[d];
        }
        update<1, true>(q, at, j, h, c);
      }
      return;
    }
    int64_t i = begin;
    if constexpr (kW > 1) {
      if (q.param.template aligned<kW>(begin) && is_aligned<kW>(q.grad + begin) && is_aligned<kW>(q.sum + begin)) {
        const int64_t groups = (end - begin) / kW;
        for (int64_t k = threadIdx.x; k < groups; k += blockDim.x) {
          update<kW, false>(q, begin + k * kW, begin + k * kW, h, c);
        }
        i = begin + groups * kW;
      }
    }
    for (i += threadIdx.x; i < end; i += blockDim.x) update<1, false>(q, i, i, h, c);
  }
};

void adagrad_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList state_steps, at::TensorList master_params, at::TensorList compensations,
                       double lr, double lr_decay, double weight_decay, double eps, bool maximize,
                       const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& lr_tensor) {
  const OptimizerInputs in = check_adagrad_step(kOp, params, grads, state_sums, state_steps, master_params,
                                              compensations, weight_decay, grad_mult, found_inf, lr_tensor);
  const size_t n = params.size();
  if (n == 0) return;
  TORCH_CHECK(params[0].device().type() == kDeviceType, kOp, ": the cuda backend takes CUDA tensors, got ",
              params[0].device());
  TORCH_CHECK(check_same_step_dtype(state_steps), kOp, ": expected every state_steps tensor to have one dtype");
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(!grads[i].is_sparse() || grads[i].sparse_dim() <= kMaxSparseDims, kOp, ": grads[", i, "] has ",
                grads[i].sparse_dim(), " sparse dimensions; the cuda backend takes up to ", kMaxSparseDims);
  }
  const DeviceGuard guard(params[0].device());

  std::vector<AdagradEntry> entries(n);
  std::vector<int64_t> work(n);
  // Coalesced sparse gradients, alive until the launch (on the current stream: the caching
  // allocator hands their memory only to work ordered after it).
  std::vector<at::Tensor> keep;
  for (size_t i = 0; i < n; ++i) {
    AdagradEntry& e = entries[i];
    e = AdagradEntry{};
    e.param = params[i].data_ptr();
    e.sum = state_sums[i].data_ptr();
    e.master = in.low.master(i);
    e.compensation = in.low.compensation(i);
    e.step = state_steps[i].const_data_ptr();
    e.numel = params[i].numel();
    if (grads[i].is_sparse()) {
      const at::Tensor g = grads[i].is_coalesced() ? grads[i] : grads[i].coalesce();
      const at::Tensor values = g._values().contiguous();
      const at::Tensor indices = g._indices();
      keep.push_back(values);
      keep.push_back(indices);
      const int64_t nnz = g._nnz();
      e.grad = values.const_data_ptr();
      e.indices = indices.const_data_ptr<int64_t>();
      e.index_dim_stride = indices.stride(0);
      e.index_row_stride = indices.stride(1);
      e.row_numel = nnz == 0 ? 1 : values.numel() / nnz;
      e.sparse_dim = static_cast<int>(g.sparse_dim());
      for (int d = 0; d < e.sparse_dim; ++d) {
        e.sizes[d] = params[i].size(d);
        e.strides[d] = params[i].stride(d);
      }
      e.numel = values.numel();
    } else {
      e.grad = grads[i].const_data_ptr();
    }
    work[i] = e.numel;
  }
  const AdagradHyper h{lr_decay, eps, weight_decay, maximize, grad_mult.has_value()};
  const StepScalars s = step_scalars(lr, lr_tensor, state_steps, grad_mult, found_inf);
  dispatch_optimizer_types(in.dtype, in.grad_dtype, in.low.mode, [&](auto p, auto g, auto mode) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    launch_multi_tensor(entries, work, AdagradChunk<P, G, decltype(mode)::value>{}, h, s);
  });
  advance_steps(state_steps, s.found_inf);
  bump_versions({params, state_sums, state_steps, master_params, compensations});
}

}  // namespace
}  // namespace pyeff::cuda

PYEFF_REGISTER_CUDA("adagrad_step", &pyeff::cuda::adagrad_step_cuda)
// A sparse gradient in the list makes the dispatcher pick the SparseCUDA key; same kernel.
PYEFF_REGISTER_SPARSE_CUDA("adagrad_step", &pyeff::cuda::adagrad_step_cuda)
