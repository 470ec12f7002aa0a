#pragma once
// The few non-operator functions of the optimizer math, spelled for scalars on the host and the
// device. csrc/cpu/vec_utils.h adds the at::vec::Vectorized spellings, so that one templated
// update function (csrc/<op>_math.h) serves the CPU's vector body, its scalar tail and the CUDA
// kernels, with the same operations in the same order.
#include <c10/macros/Macros.h>

#include <cmath>

namespace pyeff {

template <typename T>
struct MathOps;

template <typename T>
struct ScalarOps {
  static C10_HOST_DEVICE T neg(T x) { return -x; }
  // torch.maximum: NaN if either input is NaN.
  static C10_HOST_DEVICE T maximum(T a, T b) { return (a != a) ? a : ((b != b) ? b : (a < b ? b : a)); }
};

template <>
struct MathOps<float> : ScalarOps<float> {
  static C10_HOST_DEVICE float sqrt(float x) { return ::sqrtf(x); }  // correctly rounded on both
};

template <>
struct MathOps<double> : ScalarOps<double> {
  static C10_HOST_DEVICE double sqrt(double x) { return ::sqrt(x); }
};

}  // namespace pyeff
