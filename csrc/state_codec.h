#pragma once
// NOTE [compressed optimizer state]
// How the optimizer ops store compressed moments (Adam's exp_avg / exp_avg_sq / max_exp_avg_sq,
// Adagrad's sum), written once for the host and the device; the kernels load a moment into fp32,
// update it, and store it again in the same pass. Reference: pyeff/ops/state_codec.py.
//
// bfloat16: rounded to nearest even, or stochastically (with rounding=stochastic, from 16 random
// bits, NOTE [random bits]): up = (bits + r) >> 16, so a value rounds away from zero with
// probability (its low 16 bits) / 2^16 and the stored value is unbiased. NaN stays NaN.
//
// int8 blocks: a tensor is cut into blocks of kQuantBlock = 256 consecutive elements (memory
// order; the last one may be shorter); each block keeps an fp32 scale, `absmax` = the largest
// finite magnitude in the block (at least 2^-126, the smallest normal float, so that 1/absmax is
// finite), and one byte per element, the code of x = value / absmax (|x| <= 1):
// - exp_avg (signed): sign + 4 exponent bits + 3 mantissa bits (a scaled E4M3 minifloat) with
//   subnormals, exponent bias 15 so that 1.0 is code 0x78: magnitudes 2^-17 .. 1 of absmax;
// - exp_avg_sq, max_exp_avg_sq, sum (unsigned: they are >= 0): 5 exponent bits + 3 mantissa bits
//   (E5M3, the sign bit spent on range), bias 31, 1.0 is code 0xF8: magnitudes 2^-33 .. 1.
// Why this code rather than the dynamic-exponent map of bitsandbytes / torchao's 8-bit Adam (a
// 256-entry table, decades of 10 with fewer fraction bits at each, nearest code found by a binary
// search): both are non-linear codes with a floating exponent; a minifloat is encoded and decoded
// with a few integer operations on the fp32 bits (no table, no search), which vectorises on the
// CPU and is bit-identical on every backend, and its relative precision is the same at every
// magnitude (the table's is better near the block's largest value and worse a decade or more
// below it). Adam's update m / (sqrt(v) + eps) is equally sensitive to the relative error of every
// element, and v spans many decades within a block (squared gradients), hence E5M3 for it, as
// FP8 training keeps v with 5 exponent bits (torchao's FP8 state uses E4M3 for both).
// Rounding: to nearest even, or stochastically (16 random bits added below the kept mantissa).
// Error bounds (round to nearest): |decoded - value| <= 2^-4 |value| in the normal range, and
// <= 2^-18 absmax (signed) / 2^-34 absmax (unsigned) below it; the largest element of a block
// decodes exactly. A positive second moment never becomes 0 (its code is at least the smallest
// positive one): a zero v under a non-zero m would turn an update into m / eps. Special values:
// +-0 -> 0; inf, NaN (and a negative "second moment") -> the NaN code (0x80 signed, 0xFF
// unsigned), left out of absmax, so that the other elements of the block keep their values.
#include <c10/macros/Macros.h>
#include <c10/util/bit_cast.h>

#include <cstdint>

namespace pyeff {

constexpr int64_t kQuantBlock = 256;

// c10::bit_cast is a memcpy before C++20, which the vectoriser does not always see through.
#if defined(__CUDA_ARCH__)
C10_HOST_DEVICE inline uint32_t float_bits(float x) { return __float_as_uint(x); }
C10_HOST_DEVICE inline float bits_float(uint32_t b) { return __uint_as_float(b); }
#elif defined(__has_builtin) && __has_builtin(__builtin_bit_cast)
C10_HOST_DEVICE inline uint32_t float_bits(float x) { return __builtin_bit_cast(uint32_t, x); }
C10_HOST_DEVICE inline float bits_float(uint32_t b) { return __builtin_bit_cast(float, b); }
#else
C10_HOST_DEVICE inline uint32_t float_bits(float x) { return c10::bit_cast<uint32_t>(x); }
C10_HOST_DEVICE inline float bits_float(uint32_t b) { return c10::bit_cast<float>(b); }
#endif

// ---- bfloat16 (the bits of the rounded value)

C10_HOST_DEVICE inline uint16_t bf16_round_nearest(float x) {
  const uint32_t b = float_bits(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

C10_HOST_DEVICE inline uint16_t bf16_round_stochastic(float x, uint32_t r16) {
  const uint32_t b = float_bits(x);
  return (b & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : static_cast<uint16_t>((b + r16) >> 16);
}

// ---- int8 block codes

template <bool SIGNED>
struct Code8 {
  static constexpr uint32_t kBias = SIGNED ? 15u : 31u;                // exponent field kBias <=> 2^0
  static constexpr uint32_t kOne = kBias << 3;                          // the code of 1.0
  static constexpr uint32_t kNaN = SIGNED ? 0x80u : 0xFFu;
  static constexpr uint32_t kMinNormalBits = (128u - kBias) << 23;      // fp32 bits of 2^(1 - kBias)
  static constexpr uint32_t kRebias = (127u - kBias) << 3;              // fp32 exponent -> code exponent
  static constexpr float kPerUnit = SIGNED ? 0x1p17f : 0x1p33f;         // 1 / the smallest positive code
};

// The code of a finite magnitude with fp32 bits b (x = value / absmax), clamped to 1.0. Normal
// range: the fp32 mantissa rounded to 3 bits by an integer add (to nearest even, or + random bits
// below them), the carry moving into the exponent; subnormal range: the magnitude in units of the
// smallest code, rounded to an integer (RNE by adding and subtracting 2^23, or + r / 2^16 and
// truncated). Every select is between integers and every float operation runs unconditionally,
// so that the CPU loops over these functions vectorise (csrc/cpu/state_io.h).
template <bool SIGNED>
C10_HOST_DEVICE inline uint32_t encode_magnitude(uint32_t b, uint32_t r16, bool stochastic) {
  using C = Code8<SIGNED>;
  const uint32_t add = stochastic ? (r16 << 4) : (0x7ffffu + ((b >> 20) & 1u));
  const uint32_t normal = ((b + add) >> 20) - C::kRebias;
  const float units = bits_float(b < C::kMinNormalBits ? b : C::kMinNormalBits) * C::kPerUnit;  // <= 8
  const float rounded = stochastic ? units + static_cast<float>(static_cast<int32_t>(r16)) * 0x1p-16f
                                   : (units + 0x1p23f) - 0x1p23f;
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(rounded));
  const uint32_t code = b >= C::kMinNormalBits ? normal : sub;
  return code < C::kOne ? code : C::kOne;
}

// x = value / absmax, |x| <= 1 (a little more from rounding is clamped).
C10_HOST_DEVICE inline uint8_t encode_signed(float x, uint32_t r16, bool stochastic) {
  const uint32_t b = float_bits(x);
  const uint32_t a = b & 0x7fffffffu;
  const bool finite = a < 0x7f800000u;
  const uint32_t mag = encode_magnitude<true>(finite ? a : 0u, r16, stochastic);
  const uint32_t sign = (b >> 24) & 0x80u & (0u - static_cast<uint32_t>(mag != 0u));  // -0 is code 0
  return static_cast<uint8_t>(finite ? (mag | sign) : Code8<true>::kNaN);
}

C10_HOST_DEVICE inline uint8_t encode_unsigned(float x, uint32_t r16, bool stochastic) {
  const uint32_t b = float_bits(x);
  const uint32_t a = b & 0x7fffffffu;
  const bool bad = (b > 0x80000000u) | (a >= 0x7f800000u);  // negative, inf or NaN
  const uint32_t code = encode_magnitude<false>(bad ? 0u : a, r16, stochastic);
  const uint32_t least = a != 0u;  // a positive value keeps a positive code
  return static_cast<uint8_t>(bad ? Code8<false>::kNaN : (code > least ? code : least));
}

template <bool SIGNED>
C10_HOST_DEVICE inline float decode_code(uint8_t c) {
  using C = Code8<SIGNED>;
  const uint32_t code = c;
  const uint32_t mag = SIGNED ? (code & 0x7fu) : code;
  // a subnormal code: mag (exact as a float) times 2^-(bias + 2), by lowering its exponent
  const uint32_t whole = float_bits(static_cast<float>(static_cast<int32_t>(mag)));
  const uint32_t sub = mag != 0u ? whole - ((C::kBias + 2u) << 23) : 0u;
  uint32_t bits = mag >= 8u ? (mag + C::kRebias) << 20 : sub;
  if (SIGNED) bits |= (code & 0x80u) << 24;
  return bits_float(code == C::kNaN ? 0x7fc00000u : bits);
}

// The block's scale from the largest finite magnitude of its values (see the note).
C10_HOST_DEVICE inline float block_absmax(float largest) { return largest > 0x1p-126f ? largest : 0x1p-126f; }

// The fp32 bits of |x| when x is finite, else 0: a block's absmax is the largest of these (bits of
// non-negative floats order as the floats do, so the maximum is an integer one, and vectorises).
C10_HOST_DEVICE inline int32_t finite_magnitude_bits(float x) {
  const uint32_t a = float_bits(x) & 0x7fffffffu;
  return static_cast<int32_t>(a < 0x7f800000u ? a : 0u);
}

}  // namespace pyeff
