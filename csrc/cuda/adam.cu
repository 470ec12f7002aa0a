// adam_step's CUDA backend: one launch over every tensor of the call (NOTE [multi-tensor launch]),
// the update of csrc/adam_math.h per element, then one launch that advances the step counts, and
// registration as torch.ops.pyeff.adam_step.cuda. Nothing is read on the host: the learning rate
// (when a tensor), the gradient multiplier, found_inf and the step counts are read by the kernels.
// Moments stored as int8 codes take the rounds of NOTE [CUDA int8 blocks] (csrc/cuda/state_io.cuh).
// Contract and reference: pyeff/ops/adam.py; checks: csrc/adam.h.
#include <ATen/core/Tensor.h>

#include "adam.h"
#include "adam_math.h"
#include "cuda/optimizer.cuh"
#include "cuda/state_io.cuh"
#include "cuda/steps.cuh"

namespace pyeff::cuda {
namespace {

constexpr const char* kOp = "adam_step";

struct AdamEntry {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;          // amsgrad only
  float* master;                 // MASTER only
  void* compensation;            // KAHAN only
  float* exp_avg_absmax;         // int8 codes only (NOTE [compressed optimizer state])
  float* exp_avg_sq_absmax;      // int8 codes only
  float* max_exp_avg_sq_absmax;  // int8 codes and amsgrad only
  int64_t seed;                  // stochastic rounding only (NOTE [random bits])
  const void* step;              // the step count before this step
  int64_t numel;
};

// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE, moment
// storage MS (Q8: int8 codes), SR: round bf16 values and codes stochastically.
template <typename P, typename G, PrecisionMode MODE, typename MS, bool SR>
struct AdamChunk {
  using Acc = acc_t<P>;
  static constexpr bool kCoded = std::is_same_v<MS, Q8>;
  using M = std::conditional_t<kCoded, float, MS>;  // the element path's moment storage
  // The int8 rounds and stochastic rounding need more than the 64 registers of 2 blocks per SM.
  static constexpr int kBlocksPerSm = kCoded || SR ? 1 : 2;

  struct Ptrs {
    ParamAccess<P, MODE> param;
    const G* grad;
    M* exp_avg;
    M* exp_avg_sq;
    M* max_sq;
  };

  // The arrays of a tensor from element `at`.
  C10_DEVICE static Ptrs pointers(const AdamEntry& e, int64_t at) {
    return {{static_cast<P*>(e.param) + at, offset(e.master, at), offset(static_cast<P*>(e.compensation), at)},
            static_cast<const G*>(e.grad) + at,
            static_cast<M*>(e.exp_avg) + at,
            static_cast<M*>(e.exp_avg_sq) + at,
            offset(static_cast<M*>(e.max_exp_avg_sq), at)};
  }

  // The keys of random words 0 (exp_avg, exp_avg_sq) and 1 (max_exp_avg_sq, parameter) of
  // NOTE [random bits], when SR.
  struct Rounding {
    RandomKey key0, key1;
    int64_t first;  // the place in the tensor of the element the pointers point at
  };

  // The parameter's W elements from i; a bf16 one without master weights or compensation rounded
  // stochastically when SR.
  template <int W>
  C10_DEVICE static void store_param(const Ptrs& q, int64_t i, const Acc (&p)[W], const Acc (&old)[W],
                                     const Rounding& r) {
    if constexpr (SR && std::is_same_v<P, c10::BFloat16> && MODE == PrecisionMode::PLAIN) {
      store_rounded<W>(q.param.param, i, p, r.key1, slot::kAdamParam, r.first + i);
    } else {
      q.param.template store<W>(i, p, old);
    }
  }

  template <int W, typename T>
  C10_DEVICE static void store_moment(T* base, int64_t i, const Acc (&v)[W], const Rounding& r, const RandomKey& key,
                                      int slot) {
    if constexpr (SR && std::is_same_v<T, c10::BFloat16>) {
      store_rounded<W>(base, i, v, key, slot, r.first + i);
    } else {
      store<W>(base, i, v);
    }
  }

  // W consecutive elements from i: load, update (csrc/adam_math.h), store.
  template <int W>
  C10_DEVICE static void update(const Ptrs& q, int64_t i, const AdamHyper& h, const AdamCoef<Acc>& c,
                                const Rounding& r) {
    Acc p[W], g[W], m[W], v[W], x[W] = {}, old[W];
    q.param.template load<W>(i, p);
    load<W>(q.grad, i, g);
    load<W>(q.exp_avg, i, m);
    load<W>(q.exp_avg_sq, i, v);
    if (h.amsgrad) load<W>(q.max_sq, i, x);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      old[k] = p[k];
      adam_math(h, c, p[k], g[k], m[k], v[k], x[k]);
    }
    store_moment<W>(q.exp_avg, i, m, r, r.key0, slot::kExpAvg);
    store_moment<W>(q.exp_avg_sq, i, v, r, r.key0, slot::kExpAvgSq);
    if (h.amsgrad) store_moment<W>(q.max_sq, i, x, r, r.key1, slot::kMaxExpAvgSq);
    store_param<W>(q, i, p, old, r);
  }

  // The chunk [begin, end) of a tensor whose moments are int8 codes: rounds of NOTE [CUDA int8
  // blocks], kQ8PerThread consecutive elements per thread.
  C10_DEVICE static void update_coded(const AdamEntry& e, int64_t begin, int64_t end, const AdamHyper& h,
                                      const AdamCoef<Acc>& c, const Rounding& r) {
    constexpr int kN = kQ8PerThread;
    const CodedRun<true> exp_avg{static_cast<uint8_t*>(e.exp_avg), e.exp_avg_absmax};
    const CodedRun<false> exp_avg_sq{static_cast<uint8_t*>(e.exp_avg_sq), e.exp_avg_sq_absmax};
    const CodedRun<false> max_sq{static_cast<uint8_t*>(e.max_exp_avg_sq), e.max_exp_avg_sq_absmax};
    const Ptrs q = pointers(e, 0);
    for (int64_t round = begin; round < end; round += int64_t(kThreads) * kN) {
      const int64_t i = round + int64_t(threadIdx.x) * kN;  // this thread's first element
      const int n = i >= end ? 0 : (end - i < kN ? static_cast<int>(end - i) : kN);
      Acc m[kN], v[kN], x[kN] = {};
      exp_avg.load(i, n, m);
      exp_avg_sq.load(i, n, v);
      if (h.amsgrad) max_sq.load(i, n, x);
      update_elements<kN, Acc>(
          q.param, q.grad, i, n, [&](int k, Acc& p, Acc g) { adam_math(h, c, p, g, m[k], v[k], x[k]); },
          [&](int64_t at, const Acc(&p)[1], const Acc(&old)[1]) { store_param<1>(q, at, p, old, r); });
      const int32_t mine[3] = {largest_bits(m, n), largest_bits(v, n), largest_bits(x, n)};
      float absmax[3];
      group_absmax<3>(mine, absmax);
      exp_avg.template store<SR>(i, n, m, absmax[0], r.key0, slot::kExpAvg);
      exp_avg_sq.template store<SR>(i, n, v, absmax[1], r.key0, slot::kExpAvgSq);
      if (h.amsgrad) max_sq.template store<SR>(i, n, x, absmax[2], r.key1, slot::kMaxExpAvgSq);
    }
  }

  C10_DEVICE void operator()(const AdamEntry& e, int64_t begin, int64_t end, const AdamHyper& h,
                             const StepScalars& s) const {
    if (s.skip()) return;
    const double step = s.step(e.step);
    const auto c = adam_coef<Acc, Acc>(h, s.learning_rate(), step, s.multiplier<Acc>());
    Rounding r{};
    if constexpr (SR) {
      r.key0 = random_key(e.seed, static_cast<int64_t>(step), 0);
      r.key1 = random_key(e.seed, static_cast<int64_t>(step), 1);
    }
    if constexpr (kCoded) {
      update_coded(e, begin, end, h, c, r);
    } else {
      constexpr int kW = kVec<P>;
      const Ptrs q = pointers(e, begin);
      r.first = begin;
      const int64_t n = end - begin;
      int64_t i = 0;
      if constexpr (kW > 1) {
        if (q.param.template aligned<kW>(0) && is_aligned<kW>(q.grad) && is_aligned<kW>(q.exp_avg) &&
            is_aligned<kW>(q.exp_avg_sq) && (!h.amsgrad || is_aligned<kW>(q.max_sq))) {
          const int64_t groups = n / kW;
          for (int64_t k = threadIdx.x; k < groups; k += blockDim.x) update<kW>(q, k * kW, h, c, r);
          i = groups * kW;
        }
      }
      for (i += threadIdx.x; i < n; i += blockDim.x) update<1>(q, i, h, c, r);
    }
  }
};

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                    at::TensorList master_params, at::TensorList compensations, at::TensorList exp_avg_absmaxes,
                    at::TensorList exp_avg_sq_absmaxes, at::TensorList max_exp_avg_sq_absmaxes,
                    at::IntArrayRef rng_seeds, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& lr_tensor) {
  const OptimizerInputs in =
      check_adam_step(kOp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
                      compensations, exp_avg_absmaxes, exp_avg_sq_absmaxes, max_exp_avg_sq_absmaxes, rng_seeds,
                      amsgrad, grad_mult, found_inf, lr_tensor);
  const size_t n = params.size();
  if (n == 0) return;
  TORCH_CHECK(params[0].device().type() == kDeviceType, kOp, ": the cuda backend takes CUDA tensors, got ",
              params[0].device());
  TORCH_CHECK(check_same_step_dtype(state_steps), kOp, ": expected every state_steps tensor to have one dtype");
  const DeviceGuard guard(params[0].device());

  const bool coded = in.state.quantized;
  std::vector<AdamEntry> entries(n);
  std::vector<int64_t> work(n);
  for (size_t i = 0; i < n; ++i) {
    entries[i] = {params[i].data_ptr(),
                  grads[i].const_data_ptr(),
                  exp_avgs[i].data_ptr(),
                  exp_avg_sqs[i].data_ptr(),
                  amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr,
                  in.low.master(i),
                  in.low.compensation(i),
                  coded ? exp_avg_absmaxes[i].data_ptr<float>() : nullptr,
                  coded ? exp_avg_sq_absmaxes[i].data_ptr<float>() : nullptr,
                  coded && amsgrad ? max_exp_avg_sq_absmaxes[i].data_ptr<float>() : nullptr,
                  rng_seeds.empty() ? 0 : rng_seeds[i],
                  state_steps[i].const_data_ptr(),
                  params[i].numel()};
    work[i] = params[i].numel();
  }
  const AdamHyper h{beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult.has_value()};
  const StepScalars s = step_scalars(lr, lr_tensor, state_steps, grad_mult, found_inf);
  launch_optimizer_step<AdamChunk>(in.dtype, in.grad_dtype, in.low.mode, in.state.moment_dtype, in.state.stochastic,
                                   entries, work, h, s);
  advance_steps(state_steps, s.found_inf);
  bump_versions({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, compensations,
                 exp_avg_absmaxes, exp_avg_sq_absmaxes, max_exp_avg_sq_absmaxes});
}

}  // namespace
}  // namespace pyeff::cuda

PYEFF_REGISTER_CUDA("adam_step", &pyeff::cuda::adam_step_cuda)
