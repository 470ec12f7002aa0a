#pragma once
// The CPU optimizer kernels' path for compressed state (NOTE [compressed optimizer state],
// csrc/state_codec.h) and stochastic rounding (NOTE [random bits]): a run of up to kQuantBlock
// elements is loaded into fp32 arrays on the stack, updated by the op's vector math, and stored
// again, all in one pass over memory. The int8 codes go through the AVX-512 / AVX2 loops of
// cpu/state_codec_vec.h; the other loops call the scalar host-device functions of state_codec.h /
// random_bits.h, which the compiler vectorises (integer and IEEE fp32 operations only, no FMA
// contraction: every lane computes what the scalar code computes, so the bits are those of the
// CUDA and Triton kernels and of the reference).
#ifndef CPU_CAPABILITY
#error "state_io.h is for csrc/cpu/*_kernel.cpp, which setup.py compiles once per ISA"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "optimizer_types.h"
#include "cpu/state_codec_vec.h"
#include "random_bits.h"
#include "state_codec.h"

namespace pyeff::cpu::CPU_CAPABILITY {

// The random words of elements [at, at + n) (n <= kQuantBlock).
inline void fill_random_words(const RandomKey& key, int64_t at, int64_t n, uint32_t* words) {
  for (int64_t k = 0; k < n; ++k) words[k] = random_word(key, at + k);
}

// A moment stored as M (float, double, BFloat16, Half, or Q8 codes: signed for exp_avg, unsigned
// for the second moments and Adagrad's sum), read and written a run at a time. A Q8 run is one
// whole block: `at` a multiple of kQuantBlock, n the block's length.
template <typename M, bool SIGNED>
struct MomentRun {
  void* data;
  float* absmax;  // Q8 only

  void load(int64_t at, int64_t n, float* out) const {
    if constexpr (std::is_same_v<M, Q8>) {
      q8_decode_run<SIGNED>(static_cast<const uint8_t*>(data) + at, absmax[at / kQuantBlock], n, out);
    } else {
      const M* src = static_cast<const M*>(data) + at;
      for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(src[k]);
    }
  }

  // `words` (null: round to nearest even) hold this slot's random bits at bit `shift`.
  void store(int64_t at, int64_t n, const float* in, const uint32_t* words, int shift) const {
    if constexpr (std::is_same_v<M, Q8>) {
      store_codes(at, n, in, q8_largest(in, n), words, shift);
    } else if constexpr (std::is_same_v<M, c10::BFloat16>) {
      auto* dst = static_cast<uint16_t*>(data) + at;
      if (words != nullptr) {
        for (int64_t k = 0; k < n; ++k) dst[k] = bf16_round_stochastic(in[k], (words[k] >> shift) & 0xFFFFu);
      } else {
        for (int64_t k = 0; k < n; ++k) dst[k] = bf16_round_nearest(in[k]);
      }
    } else {
      M* dst = static_cast<M*>(data) + at;
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<M>(in[k]);
    }
  }

  // Q8: the block's codes and scale, `largest` = the largest finite_magnitude_bits of in[0, n).
  void store_codes(int64_t at, int64_t n, const float* in, int32_t largest, const uint32_t* words, int shift) const {
    const float scale = block_absmax(bits_float(static_cast<uint32_t>(largest)));
    const float inv = 1.0f / scale;
    auto* codes = static_cast<uint8_t*>(data) + at;
    if (words != nullptr) {
      q8_encode_run<SIGNED, true>(in, inv, n, words, shift, codes);
    } else {
      q8_encode_run<SIGNED, false>(in, inv, n, nullptr, 0, codes);
    }
    absmax[at / kQuantBlock] = scale;
  }
};

// A bf16 parameter without master weights or compensation, rounded stochastically.
inline void store_bf16_stochastic(c10::BFloat16* param, int64_t n, const float* in, const uint32_t* words,
                                  int shift) {
  auto* dst = reinterpret_cast<uint16_t*>(param);
  for (int64_t k = 0; k < n; ++k) dst[k] = bf16_round_stochastic(in[k], (words[k] >> shift) & 0xFFFFu);
}

// The runs a thread's range [lo, hi) of a tensor takes: Q8 blocks are never split between threads,
// so a range takes the blocks that start inside it (the ranges of a parallel region partition the
// tensor, so these partition its blocks).
template <typename M>
inline void block_aligned(int64_t& lo, int64_t& hi, int64_t numel) {
  if constexpr (std::is_same_v<M, Q8>) {
    auto up = [](int64_t i) { return (i + kQuantBlock - 1) / kQuantBlock * kQuantBlock; };
    lo = std::min(up(lo), numel);
    hi = std::min(up(hi), numel);
  }
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
