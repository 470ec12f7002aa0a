// dst = src * scale, and [sum of squares, any non-finite] of dst as stored (rounded to dst's dtype,
// so that the statistics are those a later read pass over dst would find). Chunks and flushes as
// in grad_stats_kernel.cpp: the result does not depend on the number of threads.
#include "cpu/scale_grad_stats_kernel.h"
#include "cpu/vec_utils.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kChunk = 1 << 16;
constexpr int64_t kFlush = 256;

template <typename S, typename D>
GradStats span(const S* src, D* dst, int64_t lo, int64_t hi, opmath_t<D> scale) {
  using Acc = opmath_t<D>;
  static_assert(std::is_same_v<Acc, opmath_t<S>>, "fp64 pairs only with fp64");
  using V = Vectorized<Acc>;
  constexpr int64_t kBlock = block_size<Acc>();
  const V vscale(scale);
  V nan_probe(Acc(0));  // x - x: 0 for finite x, NaN for inf/NaN
  double sumsq = 0;
  int64_t i = lo;
  while (i + kBlock <= hi) {
    V sq(Acc(0));
    const int64_t stop = std::min(hi, i + kFlush);
    for (; i + kBlock <= stop; i += kBlock) {
      V a, b;
      Io<S>::load(src + i, a, b);
      Io<D>::store(dst + i, a * vscale, b * vscale);  // dst.copy_(src * scale)
      Io<D>::load(dst + i, a, b);                     // what was stored, rounded to D
      sq = sq + a * a + b * b;
      nan_probe = nan_probe + (a - a) + (b - b);
    }
    sumsq += static_cast<double>(at::vec::vec_reduce_all<Acc>([](V& p, V& q) { return p + q; }, sq));
  }
  Acc probe = at::vec::vec_reduce_all<Acc>([](V& p, V& q) { return p + q; }, nan_probe);
  for (; i < hi; ++i) {
    Io<D>::store1(dst + i, Io<S>::load1(src + i) * scale);
    const Acc v = Io<D>::load1(dst + i);
    sumsq += static_cast<double>(v * v);
    probe += v - v;
  }
  return {sumsq, probe != probe};
}

template <typename S, typename D>
GradStats run(const ScaleGradStatsArgs& a) {
  const auto* src = static_cast<const S*>(a.src);
  auto* dst = static_cast<D*>(a.dst);
  const int64_t chunks = (a.numel + kChunk - 1) / kChunk;
  std::vector<GradStats> partials(chunks, GradStats{0.0, false});
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      partials[c] = span(src, dst, c * kChunk, std::min(a.numel, (c + 1) * kChunk), static_cast<opmath_t<D>>(a.scale));
    }
  });
  GradStats out{0.0, false};
  for (const auto& p : partials) {
    out.sum_of_squares += p.sum_of_squares;
    out.nonfinite = out.nonfinite || p.nonfinite;
  }
  return out;
}

template <typename S>
GradStats run_from(const ScaleGradStatsArgs& a) {
  switch (a.dst_dtype) {
    case c10::ScalarType::Float: return run<S, float>(a);
    case c10::ScalarType::BFloat16: return run<S, c10::BFloat16>(a);
    default: return run<S, c10::Half>(a);  // dtype pairs checked in csrc/scale_grad_stats.cpp
  }
}

}  // namespace

GradStats scale_grad_stats_kernel(const ScaleGradStatsArgs& a) {
  switch (a.src_dtype) {
    case c10::ScalarType::Double: return run<double, double>(a);
    case c10::ScalarType::Float: return run_from<float>(a);
    case c10::ScalarType::BFloat16: return run_from<c10::BFloat16>(a);
    default: return run_from<c10::Half>(a);
  }
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
