// The reduction is cut into fixed chunks whose partial sums are added in chunk order, so the result
// does not depend on the number of threads.
#include "cpu/grad_stats_kernel.h"
#include "cpu/vec_utils.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kChunk = 1 << 16;
// Squares are summed in fp32 vector lanes over this many elements, then added to a double.
constexpr int64_t kFlush = 256;

struct Partial {
  double sumsq = 0;
  bool nonfinite = false;
};

template <typename T>
void span_stats(const T* x, int64_t lo, int64_t hi, Partial& out) {
  using Acc = opmath_t<T>;
  using V = Vectorized<Acc>;
  constexpr int64_t kBlock = block_size<Acc>();
  // x - x is 0 for finite x and NaN for inf/NaN; NaN then sticks in the sum.
  V nan_probe(Acc(0));
  int64_t i = lo;
  while (i + kBlock <= hi) {
    V sq(Acc(0));
    const int64_t stop = std::min(hi, i + kFlush);
    for (; i + kBlock <= stop; i += kBlock) {
      V a, b;
      Io<T>::load(x + i, a, b);
      sq = sq + a * a + b * b;
      nan_probe = nan_probe + (a - a) + (b - b);
    }
    out.sumsq += static_cast<double>(at::vec::vec_reduce_all<Acc>([](V& p, V& q) { return p + q; }, sq));
  }
  Acc probe = at::vec::vec_reduce_all<Acc>([](V& p, V& q) { return p + q; }, nan_probe);
  for (; i < hi; ++i) {
    const Acc v = Io<T>::load1(x + i);
    out.sumsq += static_cast<double>(v * v);
    probe += v - v;
  }
  if (probe != probe) out.nonfinite = true;
}

}  // namespace

GradStats grad_stats_kernel(const GradStatsArgs& a) {
  const int64_t total = a.offsets.back();
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  std::vector<Partial> partials(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for_each_span_in(a.offsets, c * kChunk, std::min(total, (c + 1) * kChunk), [&](int64_t t, int64_t lo, int64_t hi) {
        switch (a.dtypes[t]) {
          case c10::ScalarType::Float: return span_stats(static_cast<const float*>(a.data[t]), lo, hi, partials[c]);
          case c10::ScalarType::Double: return span_stats(static_cast<const double*>(a.data[t]), lo, hi, partials[c]);
          case c10::ScalarType::BFloat16: return span_stats(static_cast<const c10::BFloat16*>(a.data[t]), lo, hi, partials[c]);
          case c10::ScalarType::Half: return span_stats(static_cast<const c10::Half*>(a.data[t]), lo, hi, partials[c]);
          default: return;  // rejected by csrc/grad_stats.cpp
        }
      });
    }
  });
  GradStats out{0.0, false};
  for (const auto& p : partials) {
    out.sum_of_squares += p.sumsq;
    out.nonfinite = out.nonfinite || p.nonfinite;
  }
  return out;
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
