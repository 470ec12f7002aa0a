#pragma once
// Reading and writing an optimizer's parameter in each NOTE [low-precision parameter modes], W
// elements at a time: the CUDA kernels' twin of csrc/cpu/param_io.h. The optimizer kernels compute
// the update on math-type values and leave the storing to this.
#include <c10/macros/Macros.h>

#include <cstdint>

#include "cuda/elementwise.cuh"
#include "low_precision_math.h"
#include "optimizer_types.h"

namespace pyeff::cuda {

template <typename P, PrecisionMode MODE>
struct ParamIo {
  using Acc = acc_t<P>;

  P* param;
  float* master;  // MASTER only
  P* comp;        // KAHAN only

  C10_HOST_DEVICE ParamIo offset(int64_t at) const {
    return {param + at, MODE == PrecisionMode::MASTER ? master + at : nullptr,
            MODE == PrecisionMode::KAHAN ? comp + at : nullptr};
  }

  // Whether every array this mode touches allows W-element vector accesses from index 0.
  template <int W>
  C10_HOST_DEVICE bool aligned() const {
    return is_aligned<W>(param) && (MODE != PrecisionMode::MASTER || is_aligned<W>(master)) &&
           (MODE != PrecisionMode::KAHAN || is_aligned<W>(comp));
  }

  // W elements from i of the parameter, or of its master copy.
  template <int W>
  C10_DEVICE void load(int64_t i, Acc (&p)[W]) const {
    if constexpr (MODE == PrecisionMode::MASTER) {
      cuda::load<W>(master, i, p);
    } else {
      cuda::load<W>(param, i, p);
    }
  }

  // Store the updated values p of the W elements from i, whose values before the update were old.
  template <int W>
  C10_DEVICE void store(int64_t i, const Acc (&p)[W], const Acc (&old)[W]) const {
    if constexpr (MODE == PrecisionMode::MASTER) {
      cuda::store<W>(master, i, p);
      cuda::store<W>(param, i, p);
    } else if constexpr (MODE == PrecisionMode::KAHAN) {
      Acc c[W], r[W];
      cuda::load<W>(comp, i, c);
#pragma unroll
      for (int k = 0; k < W; ++k) compensated_store(old[k], p[k], c[k], r[k], RoundTo<P>());
      cuda::store<W>(param, i, r);
      cuda::store<W>(comp, i, c);
    } else {
      cuda::store<W>(param, i, p);
    }
  }
};

}  // namespace pyeff::cuda
