#pragma once
// NOTE [multi-tensor launch]
// One launch covers every tensor of a (device, dtypes) bucket, as ATen's MultiTensorApply and
// apex's multi_tensor_apply do, with these choices:
// - The per-tensor table (pointers, sizes, whatever else an op needs: an `Entry`) travels in the
//   kernel's parameters: up to 32 KB with CUDA >= 12.1 on sm_70+, else 4 KB. A list that does not
//   fit takes as many launches as it needs, in order.
// - Each tensor is cut into kChunk-element chunks; the table holds the prefix sums of the chunk
//   counts, the grid strides over the launch's chunks (at most a few blocks per SM, so a large
//   tensor does not need one block per chunk), and a block finds its chunk's tensor by binary search.
// - Element indices are 64-bit throughout: a tensor over 2^31 elements works.
// Everything here but the launch itself is plain C++ over host or device code, so that
// tests/cpp/cuda_emulation.h can run the kernels on the CPU (NOTE [CUDA emulation]).
#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cuda/runtime.cuh"

#ifndef PYEFF_MTA_CHUNK
#define PYEFF_MTA_CHUNK 65536
#endif
#ifndef PYEFF_MTA_PARAM_BYTES
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
#define PYEFF_MTA_PARAM_BYTES 32000  // large kernel parameters (CUDA 12.1, sm_70+): 32764 bytes
#else
#define PYEFF_MTA_PARAM_BYTES 4000   // the classic limit is 4096 bytes
#endif
#endif

namespace pyeff::cuda {

constexpr int64_t kChunk = PYEFF_MTA_CHUNK;
constexpr int kThreads = 512;

template <typename Entry>
struct Table {
  static constexpr int kCapacity =
      static_cast<int>((PYEFF_MTA_PARAM_BYTES - 64) / (sizeof(Entry) + sizeof(int64_t))) - 1;
  static_assert(kCapacity >= 1, "a table entry does not fit in the kernel's parameters");
  int num_tensors;
  int64_t chunk_start[kCapacity + 1];  // prefix sums of the tensors' chunk counts, from 0
  Entry entries[kCapacity];

  C10_HOST_DEVICE int64_t num_chunks() const { return chunk_start[num_tensors]; }

  // The tensor holding chunk c (0 <= c < num_chunks()): the last t with chunk_start[t] <= c.
  C10_HOST_DEVICE int tensor_of(int64_t c) const {
    int lo = 0, hi = num_tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (chunk_start[mid] <= c) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
};

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Split `entries` (with their element counts, `work`) into launch tables, in order; tensors without
// elements are left out.
template <typename Entry>
std::vector<Table<Entry>> plan_tables(const std::vector<Entry>& entries, const std::vector<int64_t>& work) {
  std::vector<Table<Entry>> tables;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (work[i] == 0) continue;
    if (tables.empty() || tables.back().num_tensors == Table<Entry>::kCapacity) {
      tables.emplace_back();
      tables.back().num_tensors = 0;
      tables.back().chunk_start[0] = 0;
    }
    Table<Entry>& t = tables.back();
    t.entries[t.num_tensors] = entries[i];
    t.chunk_start[t.num_tensors + 1] = t.chunk_start[t.num_tensors] + chunks_of(work[i]);
    ++t.num_tensors;
  }
  return tables;
}

// The grid: enough blocks to fill the device (blocks_per_device), no more than there are chunks.
inline int grid_size(int64_t chunks, int blocks_per_device) {
  return static_cast<int>(chunks < blocks_per_device ? chunks : blocks_per_device);
}

// Resident blocks per SM a functor is compiled for: 2 (64 registers per thread), unless it
// declares `static constexpr int kBlocksPerSm = 1` (128 registers: optimizer variants whose
// update would spill at 64, e.g. int8 state, csrc/cuda/state_io.cuh).
template <typename F, typename = void>
struct BlocksPerSm {
  static constexpr int value = 2;
};
template <typename F>
struct BlocksPerSm<F, std::void_t<decltype(F::kBlocksPerSm)>> {
  static constexpr int value = F::kBlocksPerSm;
};

// f(entry, begin, end, args...) for every chunk [begin, end) of the table's tensors.
template <typename Entry, typename Functor, typename... Args>
__global__ void __launch_bounds__(kThreads, BlocksPerSm<Functor>::value)
    multi_tensor_kernel(const __grid_constant__ Table<Entry> table, Functor f, Args... args) {
  const int64_t chunks = table.num_chunks();
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int t = table.tensor_of(c);
    const Entry& e = table.entries[t];
    const int64_t begin = (c - table.chunk_start[t]) * kChunk;
    const int64_t end = begin + kChunk < e.numel ? begin + kChunk : e.numel;
    f(e, begin, end, args...);
  }
}

// Run f over every chunk of `entries` (whose element counts are `work`), one launch per table
// (NOTE [multi-tensor launch]).
template <typename Entry, typename Functor, typename... Args>
void launch_multi_tensor(const std::vector<Entry>& entries, const std::vector<int64_t>& work, Functor f,
                         const Args&... args) {
  const int blocks = blocks_per_device();
  for (const Table<Entry>& table : plan_tables(entries, work)) {
    launch(&multi_tensor_kernel<Entry, Functor, Args...>, grid_size(table.num_chunks(), blocks), kThreads, table, f,
           args...);
  }
}

// An aligned group of N elements, loaded and stored with one vector instruction (16 bytes) or two.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
C10_HOST_DEVICE inline bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

}  // namespace pyeff::cuda
