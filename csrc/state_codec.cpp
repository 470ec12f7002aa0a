// quantize_state / dequantize_state on the CPU: one tensor's compressed optimizer state (NOTE
// [compressed optimizer state], csrc/state_codec.h) with the very functions the optimizer kernels
// store it with, registered as torch.ops.pyeff.<op>.cpu. Contract and reference:
// pyeff/ops/state_codec.py. A dense tensor's elements are its data in memory order, the order of
// the kernels' blocks and random bits.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "random_bits.h"
#include "state_codec.h"

namespace pyeff {
namespace {

void check_dense(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": the cpu backend takes CPU tensors, got ", name, " on ", t.device());
  TORCH_CHECK(!t.is_sparse() && t.is_non_overlapping_and_dense(), op, ": expected `", name,
              "` to be dense (non-overlapping, no gaps)");
}

template <typename T>
float load_float(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}

std::tuple<at::Tensor, at::Tensor> quantize_state_cpu(const at::Tensor& x, c10::string_view code,
                                                      std::optional<int64_t> seed, int64_t step, int64_t slot) {
  constexpr const char* kOp = "quantize_state";
  const std::string name(code);
  TORCH_CHECK(name == "int8" || name == "uint8" || name == "bfloat16", kOp, ": unknown code `", name,
              "`; expected int8, uint8 or bfloat16");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
              ": expected a float32, bfloat16 or float16 tensor, got ", dtype);
  check_dense(kOp, "x", x);
  const int64_t n = x.numel();
  const void* src = x.const_data_ptr();
  auto load = dtype == at::kFloat ? &load_float<float> : dtype == at::kBFloat16 ? &load_float<c10::BFloat16>
                                                                               : &load_float<c10::Half>;
  const bool stochastic = seed.has_value();
  const RandomKey key = random_key(seed.value_or(0), step, static_cast<uint32_t>(slot / 2));
  auto r16 = [&](int64_t i) { return stochastic ? slot_bits(random_word(key, i), static_cast<int>(slot)) : 0u; };

  if (name == "bfloat16") {
    at::Tensor out = at::empty_like(x, x.options().dtype(at::kBFloat16));
    auto* dst = static_cast<uint16_t*>(out.data_ptr());
    at::parallel_for(0, n, 32768, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float v = load(src, i);
        dst[i] = stochastic ? bf16_round_stochastic(v, r16(i)) : bf16_round_nearest(v);
      }
    });
    return {out, at::empty({0}, x.options().dtype(at::kFloat))};
  }
  const bool is_signed = name == "int8";
  const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
  at::Tensor out = at::empty_like(x, x.options().dtype(is_signed ? at::kChar : at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  float* scale = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, 64, [&](int64_t b_lo, int64_t b_hi) {
    for (int64_t b = b_lo; b < b_hi; ++b) {
      const int64_t lo = b * kQuantBlock, hi = std::min(n, lo + kQuantBlock);
      int32_t largest = 0;
      for (int64_t i = lo; i < hi; ++i) largest = std::max(largest, finite_magnitude_bits(load(src, i)));
      scale[b] = block_absmax(bits_float(static_cast<uint32_t>(largest)));
      const float inv = 1.0f / scale[b];
      for (int64_t i = lo; i < hi; ++i) {
        const float v = load(src, i) * inv;
        dst[i] = is_signed ? encode_signed(v, r16(i), stochastic) : encode_unsigned(v, r16(i), stochastic);
      }
    }
  });
  return {out, absmax};
}

at::Tensor dequantize_state_cpu(const at::Tensor& codes, const at::Tensor& absmax) {
  constexpr const char* kOp = "dequantize_state";
  check_dense(kOp, "codes", codes);
  const auto dtype = codes.scalar_type();
  const int64_t n = codes.numel();
  at::Tensor out = at::empty_like(codes, codes.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  if (dtype == at::kBFloat16) {
    const auto* src = codes.const_data_ptr<c10::BFloat16>();
    at::parallel_for(0, n, 32768, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) dst[i] = static_cast<float>(src[i]);
    });
    return out;
  }
  TORCH_CHECK(dtype == at::kChar || dtype == at::kByte, kOp, ": expected int8, uint8 or bfloat16 codes, got ", dtype);
  const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.dim() == 1 && absmax.numel() == blocks &&
                  absmax.device().is_cpu(),
              kOp, ": expected `absmax` to be a float32 vector of ", blocks, " blocks for ", n, " codes, got ",
              absmax.scalar_type(), " ", absmax.sizes());
  const at::Tensor scales = absmax.contiguous();
  const float* scale = scales.const_data_ptr<float>();
  const auto* src = static_cast<const uint8_t*>(codes.const_data_ptr());
  const bool is_signed = dtype == at::kChar;
  at::parallel_for(0, n, 32768, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      dst[i] = (is_signed ? decode_code<true>(src[i]) : decode_code<false>(src[i])) * scale[i / kQuantBlock];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) {
  m.impl("quantize_state.cpu", &quantize_state_cpu);
  m.impl("dequantize_state.cpu", &dequantize_state_cpu);
}

}  // namespace pyeff
