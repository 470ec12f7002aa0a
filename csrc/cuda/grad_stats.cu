// grad_stats's CUDA backend: one read-only pass over every gradient of the call, and registration as
// torch.ops.pyeff.grad_stats.cuda. Contract and reference: pyeff/ops/grad_stats.py; checks:
// csrc/grad_stats.h.
//
// NOTE [deterministic grad_stats]
// The same bits on every run: each thread sums the squares of its elements of a chunk in the math
// type (fp32; fp64 for fp64), adds that to its double total, and a block adds its threads' totals
// in a fixed tree into its partial. The grid is fixed for a call (the device's resident blocks, at
// most kMaxBlocks) and blocks take chunks in a fixed order, so every partial is too. The last block
// to finish (a counter in the scratch buffer) adds the partials in a fixed tree and writes out; a
// list that takes several launches accumulates the partials across them. Nothing is allocated
// after the first call on a stream (runtime.cuh's scratch), nothing is read on the host.
#include <ATen/core/Tensor.h>

#include <cmath>

#include "cuda/elementwise.cuh"
#include "grad_stats.h"

namespace pyeff::cuda {
namespace {

constexpr const char* kOp = "grad_stats";
constexpr int kMaxBlocks = 1024;

enum class Dtype : int { F32, F64, BF16, F16 };

struct StatsEntry {
  const void* data;
  int64_t numel;
  Dtype dtype;
};

struct Scratch {
  double partial_sum[kMaxBlocks];
  int partial_nonfinite[kMaxBlocks];
  unsigned int blocks_done;
};

// Sum of squares of elements [begin, end) that this thread takes, and whether any is inf/NaN.
template <typename T>
C10_DEVICE void chunk_stats(const T* x, int64_t begin, int64_t end, double& total, bool& nonfinite) {
  using Acc = acc_t<T>;
  constexpr int kW = kVec<T>;
  Acc sum = 0;
  int64_t i = begin;
  if (is_aligned<kW>(x + begin)) {
    const int64_t groups = (end - begin) / kW;
    for (int64_t k = threadIdx.x; k < groups; k += blockDim.x) {
      Acc v[kW];
      load<kW>(x, begin + k * kW, v);
#pragma unroll
      for (int j = 0; j < kW; ++j) {
        sum += v[j] * v[j];
        nonfinite |= !std::isfinite(v[j]);
      }
    }
    i = begin + groups * kW;
  }
  for (i += threadIdx.x; i < end; i += blockDim.x) {
    const Acc v = static_cast<Acc>(x[i]);
    sum += v * v;
    nonfinite |= !std::isfinite(v);
  }
  total += static_cast<double>(sum);
}

// Adds the block's values of `sum` and `flag` in a fixed tree; thread 0 holds the result.
C10_DEVICE void block_reduce(double* sum, int* flag) {
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (threadIdx.x < stride) {
      sum[threadIdx.x] += sum[threadIdx.x + stride];
      flag[threadIdx.x] |= flag[threadIdx.x + stride];
    }
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads)
    grad_stats_kernel(const __grid_constant__ Table<StatsEntry> table, Scratch* scratch, float* out, bool first,
                      bool last) {
  __shared__ double sum[kThreads];
  __shared__ int flag[kThreads];
  __shared__ bool finishing;
  double total = 0;
  bool nonfinite = false;
  for (int64_t c = blockIdx.x; c < table.num_chunks(); c += gridDim.x) {
    const int t = table.tensor_of(c);
    const StatsEntry& e = table.entries[t];
    const int64_t begin = (c - table.chunk_start[t]) * kChunk;
    const int64_t end = begin + kChunk < e.numel ? begin + kChunk : e.numel;
    switch (e.dtype) {
      case Dtype::F32: chunk_stats(static_cast<const float*>(e.data), begin, end, total, nonfinite); break;
      case Dtype::F64: chunk_stats(static_cast<const double*>(e.data), begin, end, total, nonfinite); break;
      case Dtype::BF16: chunk_stats(static_cast<const c10::BFloat16*>(e.data), begin, end, total, nonfinite); break;
      case Dtype::F16: chunk_stats(static_cast<const c10::Half*>(e.data), begin, end, total, nonfinite); break;
    }
  }
  sum[threadIdx.x] = total;
  flag[threadIdx.x] = nonfinite;
  block_reduce(sum, flag);
  if (threadIdx.x == 0) {
    scratch->partial_sum[blockIdx.x] = (first ? 0.0 : scratch->partial_sum[blockIdx.x]) + sum[0];
    scratch->partial_nonfinite[blockIdx.x] = (first ? 0 : scratch->partial_nonfinite[blockIdx.x]) | flag[0];
  }
  if (!last) return;
  // The last block to get here adds the partials (NOTE [deterministic grad_stats]).
  __threadfence();
  if (threadIdx.x == 0) finishing = atomicAdd(&scratch->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!finishing) return;
  __threadfence();
  double s = 0;
  int f = 0;
  for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += blockDim.x) {
    s += static_cast<volatile double*>(scratch->partial_sum)[b];
    f |= static_cast<volatile int*>(scratch->partial_nonfinite)[b];
  }
  sum[threadIdx.x] = s;
  flag[threadIdx.x] = f;
  block_reduce(sum, flag);
  if (threadIdx.x == 0) {
    out[0] = static_cast<float>(sum[0]);
    out[1] = flag[0] ? 1.f : 0.f;
    scratch->blocks_done = 0;  // for the next call on this stream
  }
}

Dtype dtype_of(c10::ScalarType t) {
  switch (t) {
    case at::kDouble: return Dtype::F64;
    case at::kBFloat16: return Dtype::BF16;
    case at::kHalf: return Dtype::F16;
    default: return Dtype::F32;
  }
}

void grad_stats_cuda(at::TensorList grads, const at::Tensor& out) {
  check_grad_stats(kOp, grads, out);
  TORCH_CHECK(out.device().type() == kDeviceType, kOp, ": the cuda backend takes CUDA tensors, got ", out.device());
  const DeviceGuard guard(out.device());
  std::vector<StatsEntry> entries;
  std::vector<int64_t> work;
  for (const auto& g : grads) {
    entries.push_back({g.const_data_ptr(), g.numel(), dtype_of(g.scalar_type())});
    work.push_back(g.numel());
  }
  auto tables = plan_tables(entries, work);
  if (tables.empty()) {  // no elements: [0, 0]
    tables.emplace_back();
    tables.back().num_tensors = 0;
    tables.back().chunk_start[0] = 0;
  }
  int64_t chunks = 0;
  for (const auto& t : tables) chunks += t.num_chunks();
  const int grid = std::max(1, grid_size(chunks, std::min(kMaxBlocks, blocks_per_device())));
  auto* s = static_cast<Scratch*>(scratch(sizeof(Scratch)));
  for (size_t k = 0; k < tables.size(); ++k) {
    launch(&grad_stats_kernel, grid, kThreads, tables[k], s, out.data_ptr<float>(), k == 0, k + 1 == tables.size());
  }
  bump_versions({at::TensorList(out)});
}

}  // namespace
}  // namespace pyeff::cuda

PYEFF_REGISTER_CUDA("grad_stats", &pyeff::cuda::grad_stats_cuda)
