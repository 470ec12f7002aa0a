// adam_step's CUDA backend: one launch over every tensor of the call (NOTE [multi-tensor launch]),
// the update of csrc/adam_math.h per element, then one launch that advances the step counts, and
// registration as torch.ops.pyeff.adam_step.cuda. Nothing is read on the host: the learning rate
// (when a tensor), the gradient multiplier, found_inf and the step counts are read by the kernels.
// Contract and reference: pyeff/ops/adam.py; checks: csrc/adam.h.
#include <ATen/core/Tensor.h>

#include "adam.h"
#include "adam_math.h"
#include "cuda/optimizer.cuh"
#include "cuda/steps.cuh"

namespace pyeff::cuda {
namespace {

constexpr const char* kOp = "adam_step";

struct AdamEntry {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // amsgrad only
  float* master;         // MASTER only
  void* compensation;    // KAHAN only
  const void* step;      // the step count before this step
  int64_t numel;
};

// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE.
template <typename P, typename G, PrecisionMode MODE>
struct AdamChunk {
  using Acc = acc_t<P>;
  using M = state_t<P, MODE>;
  static constexpr int kW = kVec<P>;

  struct Ptrs {
    ParamAccess<P, MODE> param;
    const G* grad;
    M* exp_avg;
    M* exp_avg_sq;
    M* max_sq;
  };

  // W consecutive elements from i: load, update (csrc/adam_math.h), store.
  template <int W>
  C10_DEVICE static void update(const Ptrs& q, int64_t i, const AdamHyper& h, const AdamCoef<Acc>& c) {
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
    store<W>(q.exp_avg, i, m);
    store<W>(q.exp_avg_sq, i, v);
    if (h.amsgrad) store<W>(q.max_sq, i, x);
    q.param.template store<W>(i, p, old);
  }

  C10_DEVICE void operator()(const AdamEntry& e, int64_t begin, int64_t end, const AdamHyper& h,
                             const StepScalars& s) const {
    if (s.skip()) return;
    const auto c = adam_coef<Acc, Acc>(h, s.learning_rate(), s.step(e.step), s.multiplier<Acc>());
    const Ptrs q{{static_cast<P*>(e.param) + begin, offset(e.master, begin), offset(static_cast<P*>(e.compensation), begin)},
                 static_cast<const G*>(e.grad) + begin,
                 static_cast<M*>(e.exp_avg) + begin,
                 static_cast<M*>(e.exp_avg_sq) + begin,
                 offset(static_cast<M*>(e.max_exp_avg_sq), begin)};
    const int64_t n = end - begin;
    int64_t i = 0;
    if constexpr (kW > 1) {
      if (q.param.template aligned<kW>(0) && is_aligned<kW>(q.grad) && is_aligned<kW>(q.exp_avg) &&
          is_aligned<kW>(q.exp_avg_sq) && (!h.amsgrad || is_aligned<kW>(q.max_sq))) {
        const int64_t groups = n / kW;
        for (int64_t k = threadIdx.x; k < groups; k += blockDim.x) update<kW>(q, k * kW, h, c);
        i = groups * kW;
      }
    }
    for (i += threadIdx.x; i < n; i += blockDim.x) update<1>(q, i, h, c);
  }
};

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                    at::TensorList master_params, at::TensorList compensations, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                    bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_mult,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor) {
  const OptimizerInputs in = check_adam_step(kOp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                                        master_params, compensations, amsgrad, grad_mult, found_inf, lr_tensor);
  const size_t n = params.size();
  if (n == 0) return;
  TORCH_CHECK(params[0].device().type() == kDeviceType, kOp, ": the cuda backend takes CUDA tensors, got ",
              params[0].device());
  TORCH_CHECK(check_same_step_dtype(state_steps), kOp, ": expected every state_steps tensor to have one dtype");
  const DeviceGuard guard(params[0].device());

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
                  state_steps[i].const_data_ptr(),
                  params[i].numel()};
    work[i] = params[i].numel();
  }
  const AdamHyper h{beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult.has_value()};
  const StepScalars s = step_scalars(lr, lr_tensor, state_steps, grad_mult, found_inf);
  dispatch_optimizer_types(in.dtype, in.grad_dtype, in.low.mode, [&](auto p, auto g, auto mode) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    launch_multi_tensor(entries, work, AdamChunk<P, G, decltype(mode)::value>{}, h, s);
  });
  advance_steps(state_steps, s.found_inf);
  bump_versions({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, compensations});
}

}  // namespace
}  // namespace pyeff::cuda

PYEFF_REGISTER_CUDA("adam_step", &pyeff::cuda::adam_step_cuda)
