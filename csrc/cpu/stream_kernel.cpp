// Counts are template parameters so that the loop is as tight as a hand-written one: this is the
// ceiling the op kernels are measured against, so it must not be slower than they are.
#include "cpu/stream_kernel.h"
#include "cpu/vec_utils.h"

namespace pyeff::cpu::CPU_CAPABILITY {
namespace {

template <int RW, int RO>
void stream(const StreamArgs& a) {
  using V = Vectorized<float>;
  constexpr int64_t kBlock = 2 * V::size();
  float* rw[RW];
  const float* ro[RO > 0 ? RO : 1];
  for (int k = 0; k < RW; ++k) rw[k] = a.read_write[k];
  for (int k = 0; k < RO; ++k) ro[k] = a.read_only[k];
  at::parallel_for(0, a.numel, kParallelGrain, [&](int64_t begin, int64_t end) {
    const V c(1e-3f);
    int64_t i = begin;
    for (; i + kBlock <= end; i += kBlock) {
      // All loads first, then all stores, as an op kernel's body does.
      V x[RW][2];
      V s0(0.f), s1(0.f);
      for (int k = 0; k < RW; ++k) {
        x[k][0] = V::loadu(rw[k] + i);
        x[k][1] = V::loadu(rw[k] + i + V::size());
      }
      for (int k = 0; k < RO; ++k) {
        s0 = s0 + V::loadu(ro[k] + i);
        s1 = s1 + V::loadu(ro[k] + i + V::size());
      }
      s0 = s0 * c;
      s1 = s1 * c;
      for (int k = 0; k < RW; ++k) {
        (x[k][0] + s0).store(rw[k] + i);
        (x[k][1] + s1).store(rw[k] + i + V::size());
      }
    }
    for (; i < end; ++i) {
      float s = 0.f;
      for (int k = 0; k < RO; ++k) s += ro[k][i];
      s *= 1e-3f;
      for (int k = 0; k < RW; ++k) rw[k][i] += s;
    }
  });
}

template <int RW>
void stream_rw(const StreamArgs& a) {
  switch (a.read_only.size()) {
    case 0: return stream<RW, 0>(a);
    case 1: return stream<RW, 1>(a);
    case 2: return stream<RW, 2>(a);
    case 3: return stream<RW, 3>(a);
    default: return stream<RW, 4>(a);
  }
}

}  // namespace

void stream_inplace_kernel(const StreamArgs& a) {
  switch (a.read_write.size()) {
    case 1: return stream_rw<1>(a);
    case 2: return stream_rw<2>(a);
    case 3: return stream_rw<3>(a);
    default: return stream_rw<4>(a);
  }
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
