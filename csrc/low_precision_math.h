#pragma once
// NOTE [compensated summation]
// A bf16/fp16 parameter without an fp32 master (PrecisionMode::KAHAN, csrc/cpu/low_precision.h)
// carries each update's rounding error in a compensation buffer of its own dtype: with `old` the
// stored parameter and `p` its updated value in the math type, y = (p - old) + carried error, the
// stored parameter becomes round(old + y) and the new error y - (round(old + y) - old). Written once
// for scalars and vectors, host and device; `round` rounds to the parameter's dtype and back.
#include <c10/macros/Macros.h>

namespace pyeff {

template <typename T, typename Round>
C10_HOST_DEVICE inline void compensated_store(T old, T p, T& comp, T& rounded, const Round& round) {
  const T y = (p - old) + comp;
  rounded = round(old + y);
  comp = y - (rounded - old);
}

}  // namespace pyeff
