#pragma once
// Reading and writing an optimizer's parameter in each NOTE [low-precision parameter modes]:
// the optimizer kernels compute the update on opmath values and leave the storing to this.
#include "cpu/low_precision.h"
#include "cpu/vec_utils.h"
#include "low_precision_math.h"
#include "optimizer_types.h"

#include <c10/core/ScalarType.h>

#include <type_traits>

namespace pyeff::cpu::CPU_CAPABILITY {

template <typename P, PrecisionMode MODE>
struct ParamIo {
  using Acc = opmath_t<P>;
  using V = Vectorized<Acc>;

  P* param;
  float* master;      // MASTER only
  P* compensation;    // KAHAN only

  // One block (two vectors) of the parameter, or of its master copy.
  void load(int64_t i, V& a, V& b) const {
    if constexpr (MODE == PrecisionMode::MASTER) {
      Io<float>::load(master + i, a, b);
    } else {
      Io<P>::load(param + i, a, b);
    }
  }

  // Store the updated values p of a block whose values before the update were old.
  void store(int64_t i, V p[2], const V old[2]) const {
    if constexpr (MODE == PrecisionMode::MASTER) {
      Io<float>::store(master + i, p[0], p[1]);
      Io<P>::store(param + i, p[0], p[1]);
    } else if constexpr (MODE == PrecisionMode::KAHAN) {
      V c[2], r[2];
      Io<P>::load(compensation + i, c[0], c[1]);
      for (int k = 0; k < 2; ++k) compensated_store(old[k], p[k], c[k], r[k], &Io<P>::round_vec);
      Io<P>::store(param + i, r[0], r[1]);
      Io<P>::store(compensation + i, c[0], c[1]);
    } else {
      Io<P>::store(param + i, p[0], p[1]);
    }
  }

  // The same for one element (the scalar tail), with the same operations in the same order.
  Acc load1(int64_t i) const {
    if constexpr (MODE == PrecisionMode::MASTER) {
      return Io<float>::load1(master + i);
    } else {
      return Io<P>::load1(param + i);
    }
  }

  void store1(int64_t i, Acc p, Acc old) const {
    if constexpr (MODE == PrecisionMode::MASTER) {
      Io<float>::store1(master + i, p);
      Io<P>::store1(param + i, p);
    } else if constexpr (MODE == PrecisionMode::KAHAN) {
      Acc c = Io<P>::load1(compensation + i), r;
      compensated_store(old, p, c, r, &Io<P>::round1);
      Io<P>::store1(param + i, r);
      Io<P>::store1(compensation + i, c);
    } else {
      Io<P>::store1(param + i, p);
    }
  }

  ParamIo offset(int64_t at) const {
    return {param + at, MODE == PrecisionMode::MASTER ? master + at : nullptr,
            MODE == PrecisionMode::KAHAN ? compensation + at : nullptr};
  }
};

}  // namespace pyeff::cpu::CPU_CAPABILITY
