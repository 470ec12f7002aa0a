#pragma once
// The storage types an optimizer kernel is instantiated for, on the CPU and on CUDA: calls
// f(TypeTag<P>, TypeTag<G>, ModeTag<MODE>) with the parameters' storage type P, the gradients' G and
// the precision mode (NOTE [low-precision parameter modes], csrc/cpu/low_precision.h). A kernel's
// `run(args, TypeTag<P>, TypeTag<G>, ModeTag<MODE>...)` deduces its template arguments from them, so
// that its dispatch is one line: `[&](auto... types) { run(args, types...); }`.
// fp32/bf16/fp16 parameters take fp32/bf16/fp16 gradients, fp64 parameters fp64 ones; the low-
// precision modes exist for bf16/fp16 parameters only (the op's checks make sure of all this first).
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "cpu/low_precision.h"
#include "type_tag.h"

namespace pyeff {

using cpu::PrecisionMode;

template <PrecisionMode M> using ModeTag = std::integral_constant<PrecisionMode, M>;

template <typename F>
void dispatch_optimizer_types(c10::ScalarType dtype, c10::ScalarType grad_dtype, PrecisionMode mode, const F& f) {
  auto with_grad = [&](auto p, auto m) {
    switch (grad_dtype) {
      case c10::ScalarType::BFloat16: return f(p, TypeTag<c10::BFloat16>{}, m);
      case c10::ScalarType::Half: return f(p, TypeTag<c10::Half>{}, m);
      default: return f(p, TypeTag<float>{}, m);
    }
  };
  auto with_mode = [&](auto p) {
    switch (mode) {
      case PrecisionMode::MASTER: return with_grad(p, ModeTag<PrecisionMode::MASTER>{});
      case PrecisionMode::KAHAN: return with_grad(p, ModeTag<PrecisionMode::KAHAN>{});
      default: return with_grad(p, ModeTag<PrecisionMode::PLAIN>{});
    }
  };
  switch (dtype) {
    case c10::ScalarType::Float: return with_grad(TypeTag<float>{}, ModeTag<PrecisionMode::PLAIN>{});
    case c10::ScalarType::Double: return f(TypeTag<double>{}, TypeTag<double>{}, ModeTag<PrecisionMode::PLAIN>{});
    case c10::ScalarType::BFloat16: return with_mode(TypeTag<c10::BFloat16>{});
    case c10::ScalarType::Half: return with_mode(TypeTag<c10::Half>{});
    default: return;
  }
}

// The state a mode stores in fp32 next to a bf16/fp16 parameter P (moments, sums), else P.
template <typename P, PrecisionMode MODE>
using state_t = std::conditional_t<MODE == PrecisionMode::MASTER, float, P>;

// Moments stored as int8 block codes (NOTE [compressed optimizer state], csrc/state_codec.h).
struct Q8 {};

// As dispatch_optimizer_types, with the moments' storage M as a fourth tag (the dtype of the
// first moment: Char or Byte for int8 codes): fp64 parameters keep fp64 moments; the others take fp32,
// bf16 or int8 codes, or their own dtype (the op's checks make sure of the combination first).
template <typename F>
void dispatch_optimizer_state_types(c10::ScalarType dtype, c10::ScalarType grad_dtype, PrecisionMode mode,
                                    c10::ScalarType moment_dtype, const F& f) {
  dispatch_optimizer_types(dtype, grad_dtype, mode, [&](auto p, auto g, auto m) {
    using P = typename decltype(p)::type;
    if constexpr (std::is_same_v<P, double>) {
      return f(p, g, m, TypeTag<double>{});
    } else {
      switch (moment_dtype) {
        case c10::ScalarType::Char:
        case c10::ScalarType::Byte: return f(p, g, m, TypeTag<Q8>{});
        case c10::ScalarType::BFloat16: return f(p, g, m, TypeTag<c10::BFloat16>{});
        case c10::ScalarType::Half:
          if constexpr (std::is_same_v<P, c10::Half>) return f(p, g, m, TypeTag<c10::Half>{});
          return;
        default: return f(p, g, m, TypeTag<float>{});
      }
    }
  });
}

}  // namespace pyeff
