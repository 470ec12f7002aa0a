#pragma once
// Compressed optimizer state in the CUDA optimizer kernels (NOTE [compressed optimizer state],
// csrc/state_codec.h; NOTE [random bits], csrc/random_bits.h): bf16 values rounded stochastically,
// and the shared-memory reduction that gives a group of threads its int8 block's absmax.
//
// NOTE [CUDA int8 blocks]
// A chunk (kChunk elements, a multiple of kQuantBlock) goes in rounds of kThreads * kQ8PerThread
// elements: thread t takes kQ8PerThread consecutive ones, so the kQ8Group threads t - t % kQ8Group
// ... share one block. Each thread decodes and updates its elements in registers, the group's
// largest finite magnitude comes from shared memory (group_absmax), and each thread encodes and
// stores its codes; the group's first thread stores the block's absmax. A block never spans two
// CUDA blocks, so nothing else reads or writes its absmax during the step.
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cuda/elementwise.cuh"
#include "random_bits.h"
#include "state_codec.h"

namespace pyeff::cuda {

// 8 elements per thread (a warp per int8 block): each thread's loads of a round are in flight
// together, and a chunk takes a quarter of the barrier rounds 2 would (on the H200, 2026-11-29,
// 2 per thread made the int8-state step 4x the fp32-state step's time).
constexpr int kQ8PerThread = 8;
constexpr int kQ8Group = static_cast<int>(kQuantBlock) / kQ8PerThread;
static_assert(kChunk % kQuantBlock == 0, "a chunk must hold whole int8 blocks");
static_assert(kThreads % kQ8Group == 0, "a CUDA block must hold whole groups");

// W bf16 values from i rounded stochastically: the 16 bits of `slot` in the random word under
// `key` of each element (`index`: the first one's place in its tensor), drawn here, one element at
// a time, rather than held in registers.
template <int W>
C10_DEVICE inline void store_rounded(c10::BFloat16* base, int64_t i, const float (&v)[W], const RandomKey& key,
                                     int slot, int64_t index) {
  using M = c10::BFloat16;
  Pack<M, W> pk;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    pk.v[k] = M(bf16_round_stochastic(v[k], slot_bits(random_word(key, index + k), slot)), M::from_bits());
  }
  if constexpr (W == 1) {
    base[i] = pk.v[0];
  } else {
    *reinterpret_cast<Pack<M, W>*>(base + i) = pk;
  }
}

// The absmax of each of the N blocks this thread's group updates, from this thread's largest
// finite magnitudes (as bits, finite_magnitude_bits). Every thread of the CUDA block calls it,
// the same number of times (it holds two barriers).
template <int N>
C10_DEVICE inline void group_absmax(const int32_t (&mine)[N], float (&absmax)[N]) {
  __shared__ int32_t largest[N][kThreads];
  __syncthreads();  // the previous round's reads are done
#pragma unroll
  for (int n = 0; n < N; ++n) largest[n][threadIdx.x] = mine[n];
  __syncthreads();
  const int lead = static_cast<int>(threadIdx.x) - static_cast<int>(threadIdx.x) % kQ8Group;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    int32_t l = 0;
    for (int j = 0; j < kQ8Group; ++j) l = l > largest[n][lead + j] ? l : largest[n][lead + j];
    absmax[n] = block_absmax(bits_float(static_cast<uint32_t>(l)));
  }
}

// One thread's moment elements in an int8 block: decoded to fp32, and stored again.
template <bool SIGNED>
struct CodedRun {
  uint8_t* codes;
  float* absmax;

  C10_DEVICE void load(int64_t i, int n, float (&out)[kQ8PerThread]) const {
    const float scale = n > 0 ? absmax[i / kQuantBlock] : 0.0f;
#pragma unroll
    for (int k = 0; k < kQ8PerThread; ++k) out[k] = k < n ? decode_code<SIGNED>(codes[i + k]) * scale : 0.0f;
  }

  template <bool SR>
  C10_DEVICE void store(int64_t i, int n, const float (&v)[kQ8PerThread], float scale, const RandomKey& key,
                        int slot) const {
    const float inv = 1.0f / scale;
#pragma unroll
    for (int k = 0; k < kQ8PerThread; ++k) {
      if (k < n) {
        const uint32_t r16 = SR ? slot_bits(random_word(key, i + k), slot) : 0u;
        codes[i + k] = SIGNED ? encode_signed(v[k] * inv, r16, SR) : encode_unsigned(v[k] * inv, r16, SR);
      }
    }
    if (n > 0 && threadIdx.x % kQ8Group == 0) absmax[i / kQuantBlock] = scale;
  }
};

// A round's n <= N elements of a parameter (ParamAccess, in its mode) and its gradient: every load
// issued before any store, so that the thread's N elements are in flight at once; then, for each,
// math(k, p, g) on the parameter's value p and store(index, p, old).
template <int N, typename Acc, typename Param, typename G, typename Math, typename Store>
C10_DEVICE inline void update_elements(const Param& param, const G* grad, int64_t i, int n, Math math, Store store) {
  Acc p[N], g[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (k < n) {
      Acc one[1];
      param.template load<1>(i + k, one);
      p[k] = one[0];
      g[k] = Acc(grad[i + k]);
    }
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (k < n) {
      Acc now[1] = {p[k]};
      const Acc old[1] = {p[k]};
      math(k, now[0], g[k]);
      store(i + k, now, old);
    }
  }
}

template <int W>
C10_DEVICE inline int32_t largest_bits(const float (&v)[W], int n) {
  int32_t l = 0;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const int32_t a = k < n ? finite_magnitude_bits(v[k]) : 0;
    l = a > l ? a : l;
  }
  return l;
}

}  // namespace pyeff::cuda
