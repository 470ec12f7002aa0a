#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>

namespace pyeff::cpu {

namespace {

Isa detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  Isa isa = Isa::DEFAULT;
  // The features setup.py compiles each variant for (NOTE [per-ISA kernels]).
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")) {
    isa = Isa::AVX2;
  }
  if (isa == Isa::AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    isa = Isa::AVX512;
  }
#else
  Isa isa = Isa::DEFAULT;
#endif
  // An explicit request can only lower the level: running AVX2 code on a CPU without it would crash.
  if (const char* env = std::getenv("PYEFF_CPU_ISA")) {
    Isa asked = isa;
    if (!std::strcmp(env, "default")) asked = Isa::DEFAULT;
    else if (!std::strcmp(env, "avx2")) asked = Isa::AVX2;
    else if (!std::strcmp(env, "avx512")) asked = Isa::AVX512;
    if (static_cast<int>(asked) < static_cast<int>(isa)) isa = asked;
  }
  return isa;
}

}  // namespace

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "default";
  }
}

}  // namespace pyeff::cpu
