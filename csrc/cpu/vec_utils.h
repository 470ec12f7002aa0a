#pragma once
// Helpers for the per-ISA CPU kernels (csrc/cpu/*_kernel.cpp). Everything here lives in the
// ISA's own namespace: the header is compiled once per ISA, and identical names with different
// machine code in one binary would be an ODR violation.
#ifndef CPU_CAPABILITY
#error "vec_utils.h is for csrc/cpu/*_kernel.cpp, which setup.py compiles once per ISA"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "math_ops.h"

namespace pyeff::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// fp32 math for the low precisions, fp64 math for fp64.
template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };
template <typename T> using opmath_t = typename OpMath<T>::type;

// A block is two opmath vectors: one Vectorized<BFloat16>/<Half> widens to exactly two float vectors.
template <typename Acc> constexpr int64_t block_size() { return 2 * Vectorized<Acc>::size(); }

// Load/store one block of storage type T as two opmath vectors (Acc = opmath_t of the *parameter*;
// fp32 state of a bf16 parameter uses Io<float> with Acc = float).
template <typename T> struct Io {
  using Acc = T;  // float, double
  static void load(const T* p, Vectorized<Acc>& a, Vectorized<Acc>& b) {
    a = Vectorized<Acc>::loadu(p);
    b = Vectorized<Acc>::loadu(p + Vectorized<Acc>::size());
  }
  static void store(T* p, const Vectorized<Acc>& a, const Vectorized<Acc>& b) {
    a.store(p);
    b.store(p + Vectorized<Acc>::size());
  }
  // Round through T and back (identity for fp32/fp64).
  static void round(Vectorized<Acc>& a, Vectorized<Acc>& b) {}
  static Vectorized<Acc> round_vec(Vectorized<Acc> a) { return a; }
  static Acc load1(const T* p) { return *p; }
  static void store1(T* p, Acc x) { *p = x; }
  static Acc round1(Acc x) { return x; }
};

template <typename T> struct Io16 {  // BFloat16, Half: round to nearest even on store, as torch
  using Acc = float;
  static void load(const T* p, Vectorized<float>& a, Vectorized<float>& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
  static void store(T* p, const Vectorized<float>& a, const Vectorized<float>& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static void round(Vectorized<float>& a, Vectorized<float>& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
  }
  static Vectorized<float> round_vec(Vectorized<float> a) {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, a)));
  }
  static float load1(const T* p) { return static_cast<float>(*p); }
  static void store1(T* p, float x) { *p = static_cast<T>(x); }
  static float round1(float x) { return static_cast<float>(static_cast<T>(x)); }
};
template <> struct Io<c10::BFloat16> : Io16<c10::BFloat16> {};
template <> struct Io<c10::Half> : Io16<c10::Half> {};

}  // namespace pyeff::cpu::CPU_CAPABILITY

namespace pyeff {

// The vector spellings of csrc/math_ops.h (at::vec's Vectorized is a distinct type per ISA).
template <typename T>
struct MathOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V sqrt(const V& x) { return x.sqrt(); }
  static V neg(const V& x) { return x.neg(); }
  static V maximum(const V& a, const V& b) { return at::vec::maximum(a, b); }  // NaN-propagating
};

}  // namespace pyeff

namespace pyeff::cpu::CPU_CAPABILITY {

// Parallel over the concatenation of several tensors: one parallel region, even contiguous ranges
// per thread, each range cut at tensor boundaries. `offsets` holds n+1 prefix sums of numels.
// f(tensor_index, begin, end) receives element ranges inside that tensor.
constexpr int64_t kParallelGrain = 32768;

// f(tensor_index, begin, end) for the parts of the flat range [begin, end) inside each tensor.
template <typename F>
inline void for_each_span_in(const std::vector<int64_t>& offsets, int64_t begin, int64_t end, const F& f) {
  auto t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
  while (begin < end) {
    const int64_t stop = std::min(end, offsets[t + 1]);
    if (stop > begin) f(t, begin - offsets[t], stop - offsets[t]);
    begin = std::max(begin, stop);
    ++t;
  }
}

template <typename F>
inline void for_each_span(const std::vector<int64_t>& offsets, const F& f) {
  if (offsets.back() == 0) return;
  at::parallel_for(0, offsets.back(), kParallelGrain,
                   [&](int64_t begin, int64_t end) { for_each_span_in(offsets, begin, end, f); });
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
