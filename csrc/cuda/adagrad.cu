// adagrad_step's CUDA backend: one launch over every tensor of the call, dense gradients and the
// rows of coalesced sparse ones alike (NOTE [multi-tensor launch], NOTE [sparse Adagrad rows]), the
// update of csrc/adagrad_math.h per element, then one launch that advances the step counts;
// registration as torch.ops.pyeff.adagrad_step.cuda. Nothing is read on the host, but coalescing a
// sparse gradient (torch's coalesce() learns the number of unique rows, a sync) unless it is
// coalesced already. Sums stored as int8 codes take the rounds of NOTE [CUDA int8 blocks]
// (csrc/cuda/state_io.cuh). Contract and reference: pyeff/ops/adagrad.py; checks: csrc/adagrad.h.
#include <ATen/core/Tensor.h>

#include "adagrad.h"
#include "adagrad_math.h"
#include "cuda/optimizer.cuh"
#include "cuda/state_io.cuh"
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
  float* sum_absmax;   // int8 codes only (NOTE [compressed optimizer state])
  int64_t seed;        // stochastic rounding only (NOTE [random bits])
  const void* step;    // the step count before this step
  int64_t numel;       // elements to update: the parameter's, or nnz x row_numel for a sparse gradient
  // A sparse gradient's rows (indices null for a dense one): row r of the values lands at element
  // sum_d indices[d][r] * strides[d] of the parameter and its state.
  const int64_t* indices;
  int64_t index_dim_stride, index_row_stride, row_numel;
  int sparse_dim;
  int64_t sizes[kMaxSparseDims], strides[kMaxSparseDims];
};

// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE, sum storage
// SS (Q8: int8 codes), SR: round bf16 values and codes stochastically.
template <typename P, typename G, PrecisionMode MODE, typename SS, bool SR>
struct AdagradChunk {
  using Acc = acc_t<P>;
  static constexpr bool kCoded = std::is_same_v<SS, Q8>;
  using S = std::conditional_t<kCoded, float, SS>;  // the element path's sum storage
  // The int8 rounds and stochastic rounding need more than the 64 registers of 2 blocks per SM.
  static constexpr int kBlocksPerSm = kCoded || SR ? 1 : 2;

  struct Ptrs {
    ParamAccess<P, MODE> param;
    const G* grad;
    S* sum;
  };

  // The key of random word 0 of NOTE [random bits] (the sum in its low half, the parameter in its
  // high half), when SR. The pointers point at element 0: i is an element's place in the tensor.
  struct Rounding {
    RandomKey key;
  };

  template <int W>
  C10_DEVICE static void store_param(const Ptrs& q, int64_t i, const Acc (&p)[W], const Acc (&old)[W],
                                     const Rounding& r) {
    if constexpr (SR && std::is_same_v<P, c10::BFloat16> && MODE == PrecisionMode::PLAIN) {
      store_rounded<W>(q.param.param, i, p, r.key, slot::kAdagradParam, i);
    } else {
      q.param.template store<W>(i, p, old);
    }
  }

  // W consecutive elements: the parameter's (and its state's) from i, the gradient's from gi.
  template <int W, bool SPARSE>
  C10_DEVICE static void update(const Ptrs& q, int64_t i, int64_t gi, const AdagradHyper& h,
                                const AdagradCoef<Acc>& c, const Rounding& r) {
    Acc p[W], g[W], s[W], old[W];
    q.param.template load<W>(i, p);
    load<W>(q.grad, gi, g);
    load<W>(q.sum, i, s);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      old[k] = p[k];
      adagrad_math<SPARSE>(h, c, p[k], g[k], s[k]);
    }
    if constexpr (SR && std::is_same_v<S, c10::BFloat16>) {
      store_rounded<W>(q.sum, i, s, r.key, slot::kSum, i);
    } else {
      store<W>(q.sum, i, s);
    }
    store_param<W>(q, i, p, old, r);
  }

  // The chunk [begin, end) of a tensor whose sum is int8 codes (dense gradients only): rounds of
  // NOTE [CUDA int8 blocks], kQ8PerThread consecutive elements per thread.
  C10_DEVICE static void update_coded(const AdagradEntry& e, const Ptrs& q, int64_t begin, int64_t end,
                                      const AdagradHyper& h, const AdagradCoef<Acc>& c, const Rounding& r) {
    constexpr int kN = kQ8PerThread;
    const CodedRun<false> sum{static_cast<uint8_t*>(e.sum), e.sum_absmax};
    for (int64_t round = begin; round < end; round += int64_t(kThreads) * kN) {
      const int64_t i = round + int64_t(threadIdx.x) * kN;  // this thread's first element
      const int n = i >= end ? 0 : (end - i < kN ? static_cast<int>(end - i) : kN);
      Acc s[kN];
      sum.load(i, n, s);
      update_elements<kN, Acc>(
          q.param, q.grad, i, n, [&](int k, Acc& p, Acc g) { adagrad_math<false>(h, c, p, g, s[k]); },
          [&](int64_t at, const Acc(&p)[1], const Acc(&old)[1]) { store_param<1>(q, at, p, old, r); });
      const int32_t mine[1] = {largest_bits(s, n)};
      float absmax[1];
      group_absmax<1>(mine, absmax);
      sum.template store<SR>(i, n, s, absmax[0], r.key, slot::kSum);
    }
  }

  C10_DEVICE void operator()(const AdagradEntry& e, int64_t begin, int64_t end, const AdagradHyper& h,
                             const StepScalars& s) const {
    if (s.skip()) return;
    const double step = s.step(e.step);
    const auto c = adagrad_coef<Acc, Acc>(h, s.learning_rate(), step, s.multiplier<Acc>());
    Rounding r{};
    if constexpr (SR) r.key = random_key(e.seed, static_cast<int64_t>(step), 0);
    const Ptrs q{{static_cast<P*>(e.param), e.master, static_cast<P*>(e.compensation)},
                 static_cast<const G*>(e.grad),
                 static_cast<S*>(e.sum)};
    if constexpr (kCoded) {
      update_coded(e, q, begin, end, h, c, r);
    } else {
      update_chunk(e, q, begin, end, h, c, r);
    }
  }

  C10_DEVICE static void update_chunk(const AdagradEntry& e, const Ptrs& q, int64_t begin, int64_t end,
                                      const AdagradHyper& h, const AdagradCoef<Acc>& c, const Rounding& r) {
    constexpr int kW = kVec<P>;
    if (e.indices != nullptr) {  // a sparse gradient: element j of the values, row by row
      for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
        const int64_t row = j / e.row_numel;
        int64_t at = j - row * e.row_numel;
        for (int d = 0; d < e.sparse_dim; ++d) {
          const int64_t index = e.indices[d * e.index_dim_stride + row * e.index_row_stride];
          PYEFF_DEVICE_ASSERT(index >= 0 && index < e.sizes[d]);  // torch does not check indices
          at += index * e.strides[d];
        }
        update<1, true>(q, at, j, h, c, r);
      }
      return;
    }
    int64_t i = begin;
    if constexpr (kW > 1) {
      if (q.param.template aligned<kW>(begin) && is_aligned<kW>(q.grad + begin) && is_aligned<kW>(q.sum + begin)) {
        const int64_t groups = (end - begin) / kW;
        for (int64_t k = threadIdx.x; k < groups; k += blockDim.x) {
          update<kW, false>(q, begin + k * kW, begin + k * kW, h, c, r);
        }
        i = begin + groups * kW;
      }
    }
    for (i += threadIdx.x; i < end; i += blockDim.x) update<1, false>(q, i, i, h, c, r);
  }
};

void adagrad_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList state_steps, at::TensorList master_params, at::TensorList compensations,
                       at::TensorList state_sum_absmaxes, at::IntArrayRef rng_seeds, double lr, double lr_decay,
                       double weight_decay, double eps, bool maximize, const std::optional<at::Tensor>& grad_mult,
                       const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor) {
  const OptimizerInputs in =
      check_adagrad_step(kOp, params, grads, state_sums, state_steps, master_params, compensations,
                         state_sum_absmaxes, rng_seeds, weight_decay, grad_mult, found_inf, lr_tensor);
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
    e.sum_absmax = in.state.quantized ? state_sum_absmaxes[i].data_ptr<float>() : nullptr;
    e.seed = rng_seeds.empty() ? 0 : rng_seeds[i];
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
  launch_optimizer_step<AdagradChunk>(in.dtype, in.grad_dtype, in.low.mode, in.state.moment_dtype,
                                      in.state.stochastic, entries, work, h, s);
  advance_steps(state_steps, s.found_inf);
  bump_versions({params, state_sums, state_steps, master_params, compensations, state_sum_absmaxes});
}

}  // namespace
}  // namespace pyeff::cuda

PYEFF_REGISTER_CUDA("adagrad_step", &pyeff::cuda::adagrad_step_cuda)
// A sparse gradient in the list makes the dispatcher pick the SparseCUDA key; same kernel.
PYEFF_REGISTER_SPARSE_CUDA("adagrad_step", &pyeff::cuda::adagrad_step_cuda)
