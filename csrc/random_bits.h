#pragma once
// NOTE [random bits]
// Stochastic rounding (NOTE [compressed optimizer state], csrc/state_codec.h) draws its random bits
// from a counter-based hash, nothing stored between steps: the bits that round element i of a
// tensor depend only on the tensor's seed, its step count, the stored value they round (the slot)
// and i, its index in the tensor's memory order. So every backend (CPU SIMD, CUDA, Triton, the
// reference in torch integer ops), every thread count and every launch shape draws the same bits.
//
// The hash is lowbias32 (two 32-bit multiplies, full avalanche; a bijection on 32 bits) chained:
// a per-(tensor, step, word) key pair (k0, k1) is hashed from the seed and the step, and element i
// gets the 32-bit word mix32(mix32(lo(i) ^ k0) ^ (k1 + hi(i))). One word rounds two values: slot s
// uses the 16 bits (word(s / 2) >> 16 * (s % 2)) & 0xFFFF. Every backend spells exactly these
// integer operations (uint32 arithmetic wraps mod 2^32).
#include <c10/macros/Macros.h>

#include <cstdint>

namespace pyeff {

C10_HOST_DEVICE inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The keys of one random word of one tensor at one step. `step` is the tensor's step count after
// this step's increment (so a skipped step, which does not advance it, draws the same bits again).
struct RandomKey {
  uint32_t k0, k1;
};

C10_HOST_DEVICE inline RandomKey random_key(int64_t seed, int64_t step, uint32_t word) {
  const uint64_t s = static_cast<uint64_t>(seed);
  uint32_t k = mix32(static_cast<uint32_t>(s) ^ 0x9e3779b9U);
  k = mix32(k ^ static_cast<uint32_t>(s >> 32));
  k = mix32(k ^ static_cast<uint32_t>(static_cast<uint64_t>(step)));
  k = mix32(k + word * 0x85ebca6bU);
  return {k, mix32(k ^ 0xc2b2ae35U)};
}

// The 32 random bits of element i.
C10_HOST_DEVICE inline uint32_t random_word(const RandomKey& key, int64_t i) {
  const uint64_t u = static_cast<uint64_t>(i);
  return mix32(mix32(static_cast<uint32_t>(u) ^ key.k0) ^ (key.k1 + static_cast<uint32_t>(u >> 32)));
}

// The slots of the optimizer ops: which stored value of an element a word's half rounds.
namespace slot {
constexpr int kExpAvg = 0, kExpAvgSq = 1, kMaxExpAvgSq = 2, kAdamParam = 3;  // adam_step
constexpr int kSum = 0, kAdagradParam = 1;                                   // adagrad_step
}  // namespace slot

// The 16 bits of `slot` in its word.
C10_HOST_DEVICE inline uint32_t slot_bits(uint32_t word, int s) { return (word >> (16 * (s & 1))) & 0xFFFFu; }

}  // namespace pyeff
