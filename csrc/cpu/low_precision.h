#pragma once
// How an optimizer kernel stores a bf16/fp16 parameter (shared by the kernels' argument structs).

namespace pyeff::cpu {

// NOTE [low-precision parameter modes]
// PLAIN:  state in the parameter's dtype (as torch.optim), math in fp32/fp64, one rounding per store.
// MASTER: bf16/fp16 parameter with an fp32 master copy and fp32 state; the update is computed on the
//         master and the parameter is written as the master rounded to nearest even.
// KAHAN:  bf16/fp16 parameter and state plus a compensation buffer in the parameter's dtype that
//         carries the rounding error of each update into the next (compensated summation).
enum class PrecisionMode { PLAIN = 0, MASTER = 1, KAHAN = 2 };

}  // namespace pyeff::cpu
