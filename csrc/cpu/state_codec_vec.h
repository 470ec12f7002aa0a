#pragma once
// The int8 block codes of NOTE [compressed optimizer state] (csrc/state_codec.h) over a run of
// fp32 values, written with AVX-512 / AVX2 intrinsics. The compiler does vectorise the scalar
// functions of state_codec.h, but the selects between the normal and subnormal paths, the special
// values and the byte packing come out as mask-register traffic and spills that cost more than the
// whole fp32 update. The operations here give the same bits as those functions (tests compare
// every backend with the reference bitwise); where a step is spelled differently, the comment says
// why it is the same. The scalar functions still encode the tail of a run shorter than a vector,
// and everything in the DEFAULT build.
#ifndef CPU_CAPABILITY
#error "state_codec_vec.h is for csrc/cpu/*_kernel.cpp, which setup.py compiles once per ISA"
#endif

#include <cstdint>

#include "state_codec.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace pyeff::cpu::CPU_CAPABILITY {

template <bool SIGNED>
struct Q8Consts {
  using C = Code8<SIGNED>;
  // Normal range, rounding to nearest even: ((a + 0x7ffff + odd) >> 20) - kRebias with the
  // subtraction moved before the shift (a >= kMinNormalBits > kRebias << 20: nothing wraps).
  static constexpr uint32_t kNearestAdd = 0x7ffffu - (C::kRebias << 20);
  static constexpr uint32_t kStochasticAdd = 0u - (C::kRebias << 20);
  // Subnormal range, rounding to nearest even: |x| * kPerUnit rounded by + 2^23 - 2^23 is |x| + 2^23
  // / kPerUnit rounded at the same bit (scaling by a power of two is exact), and the integer is
  // then the low bits of that sum: its bits minus those of 2^23 / kPerUnit (< 8 units, no carry out).
  static constexpr float kMagic = 0x1p23f / C::kPerUnit;
  // Decoding: a subnormal code's mag times 2^-(kBias + 2) (exact: mag < 8, the result is normal).
  static constexpr uint32_t kSubScaleBits = (127u - (C::kBias + 2u)) << 23;
};

#if defined(CPU_CAPABILITY_AVX512)

constexpr int64_t kQ8Lanes = 16;

inline __m512i q8_set(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }

// Codes of x (already divided by the block's absmax) in the low byte of each lane; r16: the random
// bits when STOCHASTIC.
template <bool SIGNED, bool STOCHASTIC>
inline __m512i q8_encode(__m512 x, __m512i r16) {
  using C = Code8<SIGNED>;
  using K = Q8Consts<SIGNED>;
  const __m512i b = _mm512_castps_si512(x);
  const __m512i a = _mm512_and_si512(b, q8_set(0x7fffffffu));
  __m512i normal, sub;
  if constexpr (STOCHASTIC) {
    normal = _mm512_add_epi32(_mm512_add_epi32(a, _mm512_slli_epi32(r16, 4)), q8_set(K::kStochasticAdd));
    const __m512 units = _mm512_mul_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(C::kPerUnit));
    const __m512 noise = _mm512_mul_ps(_mm512_cvtepi32_ps(r16), _mm512_set1_ps(0x1p-16f));
    sub = _mm512_cvttps_epi32(_mm512_add_ps(units, noise));
  } else {
    const __mmask16 odd = _mm512_test_epi32_mask(a, q8_set(1u << 20));
    normal = _mm512_add_epi32(a, q8_set(K::kNearestAdd));
    normal = _mm512_mask_add_epi32(normal, odd, normal, q8_set(1));
    const __m512 magic = _mm512_set1_ps(K::kMagic);
    sub = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), magic)),
                           _mm512_castps_si512(magic));
  }
  normal = _mm512_srli_epi32(normal, 20);
  // Each path's lanes of the other range (and of inf / NaN) hold garbage that this select drops.
  const __mmask16 is_normal = _mm512_cmpge_epu32_mask(a, q8_set(C::kMinNormalBits));
  __m512i code = _mm512_min_epu32(_mm512_mask_blend_epi32(is_normal, sub, normal), q8_set(C::kOne));
  if constexpr (SIGNED) {
    const __mmask16 finite = _mm512_cmplt_epu32_mask(a, q8_set(0x7f800000u));
    const __mmask16 nonzero = _mm512_test_epi32_mask(code, code);
    // code | (sign bit moved to bit 7) where the code is not 0 (-0 is code 0)
    code = _mm512_mask_ternarylogic_epi32(code, nonzero, _mm512_srli_epi32(b, 24), q8_set(0x80u), 0xF8);
    return _mm512_mask_blend_epi32(finite, q8_set(C::kNaN), code);
  } else {
    // not (negative but -0, inf or NaN)
    __mmask16 good = _mm512_cmple_epu32_mask(b, q8_set(0x80000000u));
    good = _mm512_mask_cmplt_epu32_mask(good, a, q8_set(0x7f800000u));
    code = _mm512_max_epu32(code, _mm512_min_epu32(a, q8_set(1)));  // a positive value keeps a positive code
    return _mm512_mask_blend_epi32(good, q8_set(C::kNaN), code);
  }
}

template <bool SIGNED>
inline __m512 q8_decode(const uint8_t* codes) {
  using C = Code8<SIGNED>;
  using K = Q8Consts<SIGNED>;
  const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  const __m512i mag = SIGNED ? _mm512_and_si512(c, q8_set(0x7fu)) : c;
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_castsi512_ps(q8_set(K::kSubScaleBits)));
  const __m512i normal = _mm512_slli_epi32(_mm512_add_epi32(mag, q8_set(C::kRebias)), 20);
  __m512i bits = _mm512_mask_blend_epi32(_mm512_cmpge_epu32_mask(mag, q8_set(8)), _mm512_castps_si512(sub), normal);
  if constexpr (SIGNED) bits = _mm512_ternarylogic_epi32(bits, _mm512_slli_epi32(c, 24), q8_set(0x80000000u), 0xF8);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(c, q8_set(C::kNaN)), q8_set(0x7fc00000u));
  return _mm512_castsi512_ps(bits);
}

inline void q8_store_codes(uint8_t* dst, __m512i codes) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(codes));
}

// max(acc, finite_magnitude_bits(x)) per lane
inline __m512i q8_max_finite(__m512i acc, __m512 x) {
  const __m512i a = _mm512_and_si512(_mm512_castps_si512(x), q8_set(0x7fffffffu));
  return _mm512_mask_max_epi32(acc, _mm512_cmplt_epi32_mask(a, q8_set(0x7f800000u)), acc, a);
}

inline int32_t q8_reduce_max(__m512i acc) { return _mm512_reduce_max_epi32(acc); }

inline __m512i q8_random_bits(const uint32_t* words, int shift) {
  const __m512i w = _mm512_loadu_si512(words);
  return _mm512_and_si512(_mm512_srl_epi32(w, _mm_cvtsi32_si128(shift)), q8_set(0xFFFFu));
}

using Q8F = __m512;
using Q8I = __m512i;
inline Q8F q8_loadf(const float* p) { return _mm512_loadu_ps(p); }
inline void q8_storef(float* p, Q8F v) { _mm512_storeu_ps(p, v); }
inline Q8F q8_mul(Q8F a, Q8F b) { return _mm512_mul_ps(a, b); }
inline Q8F q8_setf(float v) { return _mm512_set1_ps(v); }
inline Q8I q8_zero() { return _mm512_setzero_si512(); }

#elif defined(CPU_CAPABILITY_AVX2)

constexpr int64_t kQ8Lanes = 8;

inline __m256i q8_set(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }

// Unsigned a > b for lanes that may have the top bit set (AVX2 compares are signed).
inline __m256i q8_gt_u(__m256i a, __m256i b) {
  const __m256i flip = q8_set(0x80000000u);
  return _mm256_cmpgt_epi32(_mm256_xor_si256(a, flip), _mm256_xor_si256(b, flip));
}

inline __m256i q8_select(__m256i mask, __m256i if_true, __m256i if_false) {
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(if_false), _mm256_castsi256_ps(if_true), _mm256_castsi256_ps(mask)));
}

template <bool SIGNED, bool STOCHASTIC>
inline __m256i q8_encode(__m256 x, __m256i r16) {
  using C = Code8<SIGNED>;
  using K = Q8Consts<SIGNED>;
  const __m256i b = _mm256_castps_si256(x);
  const __m256i a = _mm256_and_si256(b, q8_set(0x7fffffffu));  // compares on a are signed-safe
  __m256i normal, sub;
  if constexpr (STOCHASTIC) {
    normal = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_slli_epi32(r16, 4)), q8_set(K::kStochasticAdd));
    const __m256 units = _mm256_mul_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(C::kPerUnit));
    const __m256 noise = _mm256_mul_ps(_mm256_cvtepi32_ps(r16), _mm256_set1_ps(0x1p-16f));
    sub = _mm256_cvttps_epi32(_mm256_add_ps(units, noise));
  } else {
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), q8_set(1));
    normal = _mm256_add_epi32(_mm256_add_epi32(a, q8_set(K::kNearestAdd)), odd);
    const __m256 magic = _mm256_set1_ps(K::kMagic);
    sub = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), magic)),
                           _mm256_castps_si256(magic));
  }
  normal = _mm256_srli_epi32(normal, 20);
  const __m256i is_normal = _mm256_cmpgt_epi32(a, q8_set(C::kMinNormalBits - 1u));
  __m256i code = _mm256_min_epu32(q8_select(is_normal, normal, sub), q8_set(C::kOne));
  if constexpr (SIGNED) {
    const __m256i finite = _mm256_cmpgt_epi32(q8_set(0x7f800000u), a);
    const __m256i nonzero = _mm256_xor_si256(_mm256_cmpeq_epi32(code, _mm256_setzero_si256()), q8_set(~0u));
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(b, 24), _mm256_and_si256(nonzero, q8_set(0x80u)));
    return q8_select(finite, _mm256_or_si256(code, sign), q8_set(C::kNaN));
  } else {
    const __m256i bad = _mm256_or_si256(q8_gt_u(b, q8_set(0x80000000u)), _mm256_cmpgt_epi32(a, q8_set(0x7f7fffffu)));
    code = _mm256_max_epu32(code, _mm256_min_epu32(a, q8_set(1)));
    return q8_select(bad, q8_set(C::kNaN), code);
  }
}

template <bool SIGNED>
inline __m256 q8_decode(const uint8_t* codes) {
  using C = Code8<SIGNED>;
  using K = Q8Consts<SIGNED>;
  const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  const __m256i mag = SIGNED ? _mm256_and_si256(c, q8_set(0x7fu)) : c;
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_castsi256_ps(q8_set(K::kSubScaleBits)));
  const __m256i normal = _mm256_slli_epi32(_mm256_add_epi32(mag, q8_set(C::kRebias)), 20);
  __m256i bits = q8_select(_mm256_cmpgt_epi32(mag, q8_set(7)), normal, _mm256_castps_si256(sub));
  if constexpr (SIGNED) bits = _mm256_or_si256(bits, _mm256_slli_epi32(_mm256_and_si256(c, q8_set(0x80u)), 24));
  bits = q8_select(_mm256_cmpeq_epi32(c, q8_set(C::kNaN)), q8_set(0x7fc00000u), bits);
  return _mm256_castsi256_ps(bits);
}

inline void q8_store_codes(uint8_t* dst, __m256i codes) {  // every lane is in [0, 255]
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(w, w));
}

inline __m256i q8_max_finite(__m256i acc, __m256 x) {
  const __m256i a = _mm256_and_si256(_mm256_castps_si256(x), q8_set(0x7fffffffu));
  const __m256i finite = _mm256_cmpgt_epi32(q8_set(0x7f800000u), a);
  return _mm256_max_epi32(acc, _mm256_and_si256(a, finite));
}

inline int32_t q8_reduce_max(__m256i acc) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
  return _mm_cvtsi128_si32(m);
}

inline __m256i q8_random_bits(const uint32_t* words, int shift) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  return _mm256_and_si256(_mm256_srl_epi32(w, _mm_cvtsi32_si128(shift)), q8_set(0xFFFFu));
}

using Q8F = __m256;
using Q8I = __m256i;
inline Q8F q8_loadf(const float* p) { return _mm256_loadu_ps(p); }
inline void q8_storef(float* p, Q8F v) { _mm256_storeu_ps(p, v); }
inline Q8F q8_mul(Q8F a, Q8F b) { return _mm256_mul_ps(a, b); }
inline Q8F q8_setf(float v) { return _mm256_set1_ps(v); }
inline Q8I q8_zero() { return _mm256_setzero_si256(); }

#else

constexpr int64_t kQ8Lanes = 0;  // scalar loops only

#endif

// out[k] = the value of codes[k] in a block of scale `scale`, k < n.
template <bool SIGNED>
inline void q8_decode_run(const uint8_t* codes, float scale, int64_t n, float* out) {
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const Q8F s = q8_setf(scale);
  for (; k + kQ8Lanes <= n; k += kQ8Lanes) q8_storef(out + k, q8_mul(q8_decode<SIGNED>(codes + k), s));
#endif
  for (; k < n; ++k) out[k] = decode_code<SIGNED>(codes[k]) * scale;
}

// The largest finite_magnitude_bits of in[0, n).
inline int32_t q8_largest(const float* in, int64_t n) {
  int64_t k = 0;
  int32_t largest = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (n >= kQ8Lanes) {
    Q8I acc = q8_zero();
    for (; k + kQ8Lanes <= n; k += kQ8Lanes) acc = q8_max_finite(acc, q8_loadf(in + k));
    largest = q8_reduce_max(acc);
  }
#endif
  for (; k < n; ++k) {
    const int32_t a = finite_magnitude_bits(in[k]);
    largest = a > largest ? a : largest;
  }
  return largest;
}

// codes[k] = the code of in[k] * inv, k < n; STOCHASTIC: rounded with (words[k] >> shift) & 0xFFFF.
template <bool SIGNED, bool STOCHASTIC>
inline void q8_encode_run(const float* in, float inv, int64_t n, const uint32_t* words, int shift, uint8_t* codes) {
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const Q8F vinv = q8_setf(inv);
#if defined(CPU_CAPABILITY_AVX512)
  // 64 codes at a time: two saturating packs and a lane permute cost less than four vpmovdb.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (; k + 4 * kQ8Lanes <= n; k += 4 * kQ8Lanes) {
    __m512i c[4];
    for (int j = 0; j < 4; ++j) {
      const Q8I r16 = STOCHASTIC ? q8_random_bits(words + k + j * kQ8Lanes, shift) : q8_zero();
      c[j] = q8_encode<SIGNED, STOCHASTIC>(q8_mul(q8_loadf(in + k + j * kQ8Lanes), vinv), r16);
    }
    const __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
    _mm512_storeu_si512(codes + k, _mm512_permutexvar_epi32(order, packed));
  }
#endif
  for (; k + kQ8Lanes <= n; k += kQ8Lanes) {
    const Q8I r16 = STOCHASTIC ? q8_random_bits(words + k, shift) : q8_zero();
    q8_store_codes(codes + k, q8_encode<SIGNED, STOCHASTIC>(q8_mul(q8_loadf(in + k), vinv), r16));
  }
#endif
  for (; k < n; ++k) {
    const float x = in[k] * inv;
    const uint32_t r16 = STOCHASTIC ? (words[k] >> shift) & 0xFFFFu : 0u;
    codes[k] = SIGNED ? encode_signed(x, r16, STOCHASTIC) : encode_unsigned(x, r16, STOCHASTIC);
  }
}

}  // namespace pyeff::cpu::CPU_CAPABILITY
