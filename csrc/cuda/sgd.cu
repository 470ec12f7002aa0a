// sgd_step's CUDA backend: one launch over every tensor of the call (NOTE [multi-tensor launch]),
// the update of csrc/sgd_math.h per element, and registration as torch.ops.pyeff.sgd_step.cuda.
// Nothing is read on the host: the learning rate (when a tensor), the gradient multiplier and
// found_inf are read by the kernel. Contract and reference: pyeff/ops/sgd.py; checks: csrc/sgd.h.
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include "cuda/param_io.cuh"
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

// What every chunk reads besides its tensor's entry.
struct SgdScalars {
  SgdHyper hyper;
  double lr;              // unless lr_tensor
  const void* lr_tensor;  // float32 or float64, one element
  bool lr_is_double;
  const float* grad_mult;
  const float* found_inf;
};

// Parameter storage P, gradient storage G, NOTE [low-precision parameter modes] MODE.
template <typename P, typename G, PrecisionMode MODE>
struct SgdChunk {
  using Acc = acc_t<P>;
  using B = state_t<P, MODE>;
  static constexpr int kW = kVec<P>;

  // W consecutive elements from i: load, update (csrc/sgd_math.h), store.
  template <int W>
  C10_DEVICE static void update(const ParamIo<P, MODE>& param, const G* grad, B* buf, int64_t i, const SgdHyper& h,
                                const SgdCoef<Acc>& c, bool first) {
    Acc p[W], g[W], b[W] = {}, old[W];
    param.template load<W>(i, p);
    load<W>(grad, i, g);
    if (h.momentum != 0 && !first) load<W>(buf, i, b);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      old[k] = p[k];
      sgd_math(h, c, first, p[k], g[k], b[k]);
    }
    if (h.momentum != 0) store<W>(buf, i, b);
    param.template store<W>(i, p, old);
  }

  C10_DEVICE void operator()(const SgdEntry& e, int64_t begin, int64_t end, const SgdScalars& s) const {
    if (s.found_inf != nullptr && *s.found_inf != 0) return;  // NOTE [overflow skip] (csrc/checks.h)
    const SgdHyper& h = s.hyper;
    const double lr = s.lr_tensor != nullptr ? read_scalar(s.lr_tensor, s.lr_is_double) : s.lr;
    const SgdCoef<Acc> c = sgd_coef<Acc, Acc>(h, lr, s.grad_mult != nullptr ? Acc(*s.grad_mult) : Acc(1));
    const auto param = ParamIo<P, MODE>{static_cast<P*>(e.param), e.master, static_cast<P*>(e.compensation)}.offset(
        begin);
    const G* grad = static_cast<const G*>(e.grad) + begin;
    B* buf = h.momentum != 0 ? static_cast<B*>(e.momentum_buffer) + begin : nullptr;
    const int64_t n = end - begin;
    const bool aligned =
        param.template aligned<kW>() && is_aligned<kW>(grad) && (buf == nullptr || is_aligned<kW>(buf));
    int64_t i = 0;
    if (aligned) {
      const int64_t groups = n / kW;
      for (int64_t k = threadIdx.x; k < groups; k += blockDim.x) {
        update<kW>(param, grad, buf, k * kW, h, c, e.first_step);
      }
      i = groups * kW;
    }
    for (i += threadIdx.x; i < n; i += blockDim.x) update<1>(param, grad, buf, i, h, c, e.first_step);
  }
};

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   const c10::List<bool>& is_first_step, at::TensorList master_params, at::TensorList compensations,
                   double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& lr_tensor) {
  const SgdInputs in = check_sgd_step(kOp, params, grads, momentum_buffers, is_first_step, master_params,
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
  SgdScalars s;
  s.hyper = {momentum, dampening, weight_decay, nesterov, maximize, grad_mult.has_value()};
  s.lr = lr;
  s.lr_tensor = lr_tensor ? lr_tensor->const_data_ptr() : nullptr;
  s.lr_is_double = lr_tensor && lr_tensor->scalar_type() == at::kDouble;
  s.grad_mult = grad_mult ? grad_mult->const_data_ptr<float>() : nullptr;
  s.found_inf = found_inf ? found_inf->const_data_ptr<float>() : nullptr;

  dispatch_optimizer_types(in.dtype, in.grad_dtype, in.low.mode, [&](auto p, auto g, auto mode) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    launch_multi_tensor(entries, work, SgdChunk<P, G, decltype(mode)::value>{}, s);
  });
  bump_versions({params, momentum_buffers, master_params, compensations});
}

}  // namespace
}  // namespace pyeff::cuda

PYEFF_REGISTER_CUDA("sgd_step", &pyeff::cuda::sgd_step_cuda)
