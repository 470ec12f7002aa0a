#pragma once
// What the CUDA optimizer kernels share besides the launcher: the device scalars a step reads, the
// parameter's storage in each NOTE [low-precision parameter modes] (the CPU's is
// csrc/cpu/param_io.h), and the dispatch of a step's types to its chunk functor.
#include <ATen/core/Tensor.h>

#include "cuda/elementwise.cuh"
#include "low_precision_math.h"
#include "optimizer_types.h"

namespace pyeff::cuda {

// The scalars every chunk of a step reads besides its tensor's entry, all on the device but `lr`.
struct StepScalars {
  double lr;              // unless lr_tensor
  const void* lr_tensor;  // float32 or float64, one element
  bool lr_is_double;
  bool step_is_double;
  const float* grad_mult;
  const float* found_inf;

  // NOTE [overflow skip] (csrc/checks.h): a set found_inf makes every chunk write nothing.
  C10_DEVICE bool skip() const { return found_inf != nullptr && *found_inf != 0; }
  C10_DEVICE double learning_rate() const { return lr_tensor != nullptr ? read_scalar(lr_tensor, lr_is_double) : lr; }
  // The step count after this step's increment.
  C10_DEVICE double step(const void* count) const { return read_scalar(count, step_is_double) + 1; }
  template <typename Acc>
  C10_DEVICE Acc multiplier() const { return grad_mult != nullptr ? Acc(*grad_mult) : Acc(1); }
};

inline StepScalars step_scalars(double lr, const std::optional<at::Tensor>& lr_tensor, at::TensorList state_steps,
                                const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf) {
  return {lr,
          lr_tensor ? lr_tensor->const_data_ptr() : nullptr,
          lr_tensor && lr_tensor->scalar_type() == at::kDouble,
          !state_steps.empty() && state_steps[0].scalar_type() == at::kDouble,
          grad_mult ? grad_mult->const_data_ptr<float>() : nullptr,
          found_inf ? found_inf->const_data_ptr<float>() : nullptr};
}

// A parameter P in mode MODE, W elements at a time: loaded (its fp32 master in MASTER mode) and
// stored (master and rounded parameter, or the compensated store of NOTE [compensated summation]).
template <typename P, PrecisionMode MODE>
struct ParamAccess {
  using Acc = acc_t<P>;
  P* param;
  float* master;  // MASTER only
  P* comp;        // KAHAN only

  template <int W>
  C10_DEVICE void load(int64_t i, Acc (&p)[W]) const {
    if constexpr (MODE == PrecisionMode::MASTER) {
      pyeff::cuda::load<W>(master, i, p);
    } else {
      pyeff::cuda::load<W>(param, i, p);
    }
  }

  // Store the updated values p of elements whose values before the update were old.
  template <int W>
  C10_DEVICE void store(int64_t i, const Acc (&p)[W], const Acc (&old)[W]) const {
    if constexpr (MODE == PrecisionMode::MASTER) {
      pyeff::cuda::store<W>(master, i, p);
      pyeff::cuda::store<W>(param, i, p);
    } else if constexpr (MODE == PrecisionMode::KAHAN) {
      Acc c[W], r[W];
      pyeff::cuda::load<W>(comp, i, c);
#pragma unroll
      for (int k = 0; k < W; ++k) compensated_store(old[k], p[k], c[k], r[k], RoundTo<P>());
      pyeff::cuda::store<W>(param, i, r);
      pyeff::cuda::store<W>(comp, i, c);
    } else {
      pyeff::cuda::store<W>(param, i, p);
    }
  }

  // Whether every array this mode touches is aligned for vector accesses of W elements at `at`.
  template <int W>
  C10_DEVICE bool aligned(int64_t at) const {
    return is_aligned<W>(param + at) && (MODE != PrecisionMode::MASTER || is_aligned<W>(master + at)) &&
           (MODE != PrecisionMode::KAHAN || is_aligned<W>(comp + at));
  }
};

// One step of Chunk<P, G, MODE, M, SR> over `entries` (element counts `work`) for the step's types
// (dispatch_optimizer_state_types; M: the moments' storage): stochastic rounding (SR) is its own
// instantiation where something can be rounded (fp32 math).
template <template <typename, typename, PrecisionMode, typename, bool> class Chunk, typename Entry, typename... Args>
void launch_optimizer_step(c10::ScalarType dtype, c10::ScalarType grad_dtype, PrecisionMode mode,
                           c10::ScalarType moment_dtype, bool stochastic, const std::vector<Entry>& entries,
                           const std::vector<int64_t>& work, const Args&... args) {
  dispatch_optimizer_state_types(dtype, grad_dtype, mode, moment_dtype, [&](auto p, auto g, auto mode, auto m) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    using M = typename decltype(m)::type;
    constexpr PrecisionMode MODE = decltype(mode)::value;
    constexpr bool kMayRound = std::is_same_v<M, Q8> || std::is_same_v<M, c10::BFloat16> ||
                               (std::is_same_v<P, c10::BFloat16> && MODE == PrecisionMode::PLAIN);
    if constexpr (kMayRound) {
      if (stochastic) return launch_multi_tensor(entries, work, Chunk<P, G, MODE, M, true>{}, args...);
    }
    launch_multi_tensor(entries, work, Chunk<P, G, MODE, M, false>{}, args...);
  });
}

}  // namespace pyeff::cuda
