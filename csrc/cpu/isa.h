#pragma once
// Run-time choice among the per-ISA builds of each kernel (see NOTE [per-ISA kernels] in setup.py).
//
// A kernel source declares its entry points with PYEFF_ISA_DECLARE in a header shared with the op
// file; the op file calls PYEFF_ISA_SELECT(fn)(args...) to get the best variant for this CPU.

namespace pyeff::cpu {

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The best instruction set that was built and that this CPU supports; PYEFF_CPU_ISA=default|avx2|avx512
// lowers it (never raises it past what the CPU supports).
Isa best_isa();
const char* isa_name(Isa isa);

template <typename Fn>
Fn select_isa(Fn default_fn, Fn avx2_fn, Fn avx512_fn) {
  switch (best_isa()) {
    case Isa::AVX512: return avx512_fn;
    case Isa::AVX2: return avx2_fn;
    default: return default_fn;
  }
}

}  // namespace pyeff::cpu

#if defined(__x86_64__) || defined(_M_X64)
#define PYEFF_ISA_DECLARE(ret, fn, params)  \
  namespace DEFAULT { ret fn params; }      \
  namespace AVX2 { ret fn params; }         \
  namespace AVX512 { ret fn params; }
#define PYEFF_ISA_SELECT(fn) \
  ::pyeff::cpu::select_isa(&::pyeff::cpu::DEFAULT::fn, &::pyeff::cpu::AVX2::fn, &::pyeff::cpu::AVX512::fn)
#else
#define PYEFF_ISA_DECLARE(ret, fn, params) namespace DEFAULT { ret fn params; }
#define PYEFF_ISA_SELECT(fn) (&::pyeff::cpu::DEFAULT::fn)
#endif
