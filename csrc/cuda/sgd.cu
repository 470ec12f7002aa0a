// sgd_step's CUDA backend: one launch over every tensor of the call (NOTE [multi-tensor launch]),
// the update of csrc/sgd_math.h per element, and registration as torch.ops.pyeff.sgd_step.cuda.
// Nothing is read on the host: the learning rate (when a tensor), the gradient multiplier and
// found_inf are read by the kernel. Contract and reference: pyeff/ops/sgd.py; checks: csrc/sgd.h.
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include "cuda/optimizer.cuh"
#include "sgd.h"
#include "sgd_math.h"

namespace pyeff::cuda {
namespace {

constexpr const char* kOp = "sgd_step";

struct SgdEntry {
  void* param;
  const void* grad;
  void* momentum_buffer;  // with momentum only
  float* master;          // MASTER only
  void* compensation;     // KAHAN only
  bool first_step;        // momentum_buffer is created from the gradient
  int64_t numel;
};

// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE.
template <typename P, typename G, PrecisionMode MODE>
struct SgdChunk {
  using Acc = acc_t<P>;
  using B = state_t<P, MODE>;
  static constexpr int kW = kVec<P>;

  struct Ptrs {
    ParamAccess<P, MODE> param;
    const G* grad;
    B* buf;  // with momentum only
  };

  // W consecutive elements from i: load, update (csrc/sgd_math.h), store.
  template <int W>
  C10_DEVICE static void update(const Ptrs& q, int64_t i, const SgdHyper& h, const SgdCoef<Acc>& c, bool first) {
    Acc p[W], g[W], b[W] = {}, old[W];
    q.param.template load<W>(i, p);
    load<W>(q.grad, i, g);
    if (h.momentum != 0 && !first) load<W>(q.buf, i, b);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      old[k] = p[k];
      sgd_math(h, c, first, p[k], g[k], b[k]);
    }
    if (h.momentum != 0) store<W>(q.buf, i, b);
    q.param.template store<W>(i, p, old);
  }

  C10_DEVICE void operator()(const SgdEntry& e, int64_t begin, int64_t end, const SgdHyper& h,
                             const StepScalars& s) const {
    if (s.skip()) return;
    const auto c = sgd_coef<Acc, Acc>(h, s.learning_rate(), s.multiplier<Acc>());
    const Ptrs q{{static_cast<P*>(e.param) + begin, offset(e.master, begin),
                  offset(static_cast<P*>(e.compensation), begin)},
                 static_cast<const G*>(e.grad) + begin,
                 offset(static_cast<B*>(e.momentum_buffer), begin)};
    const int64_t n = end - begin;
    int64_t i = 0;
    if constexpr (kW > 1) {
      if (q.param.template aligned<kW>(0) && is_aligned<kW>(q.grad) && (h.momentum == 0 || is_aligned<kW>(q.buf))) {
        const int64_t groups = n / kW;
        for (int64_t k = threadIdx.x; k < groups; k += blockDim.x) update<kW>(q, k * kW, h, c, e.first_step);
        i = groups * kW;
      }
    }
    for (i += threadIdx.x; i < n; i += blockDim.x) update<1>(q, i, h, c, e.first_step);
  }
};

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   const c10::List<bool>& is_first_step, at::TensorList master_params, at::TensorList compensations,
                   double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& lr_tensor) {
  const OptimizerInputs in = check_sgd_step(kOp, params, grads, momentum_buffers, is_first_step, master_params,
                                     compensations, momentum, grad_mult, found_inf, lr_tensor);
  const size_t n = params.size();
  if (n == 0) return;
  TORCH_CHECK(params[0].device().type() == kDeviceType, kOp, ": the cuda backend takes CUDA tensors, got ",
              params[0].device());
  const DeviceGuard guard(params[0].device());

  const bool with_momentum = momentum != 0;
  std::vector<SgdEntry> entries(n);
  std::vector<int64_t> work(n);
  for (size_t i = 0; i < n; ++i) {
    entries[i] = {params[i].data_ptr(),
                  grads[i].const_data_ptr(),
                  with_momentum ? momentum_buffers[i].data_ptr() : nullptr,
                  in.low.master(i),
                  in.low.compensation(i),
                  with_momentum && is_first_step.get(i),
                  params[i].numel()};
    work[i] = params[i].numel();
  }
  const SgdHyper h{momentum, dampening, weight_decay, nesterov, maximize, grad_mult.has_value()};
  const StepScalars s = step_scalars(lr, lr_tensor, {}, grad_mult, found_inf);
  dispatch_optimizer_types(in.dtype, in.grad_dtype, in.low.mode, [&](auto p, auto g, auto mode) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    launch_multi_tensor(entries, work, SgdChunk<P, G, decltype(mode)::value>{}, h, s);
  });
  bump_versions({params, momentum_buffers, master_params, compensations});
}

}  // namespace
}  // namespace pyeff::cuda

PYEFF_REGISTER_CUDA("sgd_step", &pyeff::cuda::sgd_step_cuda)
