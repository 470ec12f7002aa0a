#pragma once
// Element access for the optimizer kernels: storage types to the math type and back (bf16/fp16
// rounded to nearest even, as torch stores them), W elements at a time (one aligned Pack when
// W > 1), and the one-element device scalars a step reads.
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cuda/multi_tensor_apply.cuh"

namespace pyeff::cuda {

// fp32 math for fp32/bf16/fp16 storage, fp64 for fp64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

// Elements per vector group for parameters of type P: 16 bytes of fp32 (8 of bf16/fp16, next to fp32
// state: 8 elements of everything would need more registers than 2 blocks per SM leave); fp64 one
// at a time (two would spill registers in Adam).
template <typename P> constexpr int kVec = sizeof(P) == 8 ? 1 : 4;

template <int W, typename T, typename Acc>
C10_DEVICE inline void load(const T* base, int64_t i, Acc (&out)[W]) {
  if constexpr (W == 1) {
    out[0] = static_cast<Acc>(base[i]);
  } else {
    const Pack<T, W> pk = *reinterpret_cast<const Pack<T, W>*>(base + i);
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = static_cast<Acc>(pk.v[k]);
  }
}

template <int W, typename T, typename Acc>
C10_DEVICE inline void store(T* base, int64_t i, const Acc (&in)[W]) {
  if constexpr (W == 1) {
    base[i] = static_cast<T>(in[0]);
  } else {
    Pack<T, W> pk;
#pragma unroll
    for (int k = 0; k < W; ++k) pk.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Pack<T, W>*>(base + i) = pk;
  }
}

// p + n, for an optional array (null stays null: arithmetic on a null pointer is undefined).
template <typename T>
C10_HOST_DEVICE inline T* offset(T* p, int64_t n) {
  return p == nullptr ? nullptr : p + n;
}

// x rounded to T and back (the compensated store's rounding, NOTE [compensated summation]).
template <typename T>
struct RoundTo {
  C10_HOST_DEVICE float operator()(float x) const { return static_cast<float>(static_cast<T>(x)); }
};

// A one-element float32 or float64 tensor's value.
C10_DEVICE inline double read_scalar(const void* p, bool is_double) {
  return is_double ? *static_cast<const double*>(p) : static_cast<double>(*static_cast<const float*>(p));
}

}  // namespace pyeff::cuda
