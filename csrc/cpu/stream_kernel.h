#pragma once
// The bandwidth ceiling loop used by the benchmarks: the simplest in-place pass that reads and
// writes the same arrays an op does, with trivial arithmetic (see DESIGN.md, Benchmarks).
#include <cstdint>
#include <vector>

#include "cpu/isa.h"

namespace pyeff::cpu {

struct StreamArgs {
  std::vector<float*> read_write;       // rw[i] = rw[i] + 1e-3 * sum(ro[i])
  std::vector<const float*> read_only;
  int64_t numel;
};

PYEFF_ISA_DECLARE(void, stream_inplace_kernel, (const StreamArgs& args))

}  // namespace pyeff::cpu
