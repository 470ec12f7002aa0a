// The CUDA pool (NOTE [CUDA pool streams and graphs], cuda_pool.h) installed as torch's CUDA
// allocator: pyeff.memory.use_cuda_pool() calls cuda_pool_install().
//
// NOTE [CUDA pool as torch's allocator]
// torch.cuda.memory.CUDAPluggableAllocator, as Python builds it, forwards only malloc and free to a
// library: Tensor.record_stream, graph capture, empty_cache and the statistics would be ignored or
// raise. Its C++ class has hooks for more (record_stream, begin/end_allocate_to_pool, release_pool,
// reset = empty_cache, memory_fraction), and its remaining virtual functions can be overridden. So
// this is a subclass of it, installed with torch's changeCurrentAllocator: it overrides what the
// allocator contract needs (allocate and the raw_* functions, with torch.OutOfMemoryError when out
// of memory and torch's CUDA error for any other cudaMalloc failure; recordStream, which knows the
// stream's device; the device statistics and their resets) and sets the hooks that are stable
// across torch 2.6 to 2.13. What it does not provide keeps torch's "pluggable does not yet
// support ..." error: memory snapshots, IPC of CUDA tensors, and torch.cuda.MemPool objects while
// the pool is torch's allocator (pyeff.memory.cuda_mem_pool() refuses that combination itself);
// CUDA graph trees (torch.compile mode="reduce-overhead") get a clear error.
// Statistics map onto torch's: a block waiting for other streams' work counts as allocated (torch's
// "active" equals "allocation" here), and there are no inactive splits or oversize blocks to report.
#ifdef PYEFF_WITH_CUDA

#include <c10/core/Allocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#include <torch/library.h>

#include <cstdio>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "allocator/cuda_pool.h"

namespace pyeff::memory::cuda {
namespace {

using Base = torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator;
using TorchStats = c10::cuda::CUDACachingAllocator::DeviceStats;
using TorchStat = std::remove_reference_t<decltype(std::declval<TorchStats&>().allocation[0])>;  // its namespace moved
using TorchPoolId = c10::cuda::MempoolId_t;
using AllocatorState = c10::cuda::CUDACachingAllocator::AllocatorState;

constexpr const char* kNoGraphTrees =
    "pyeff's CUDA pool (pyeff.memory.use_cuda_pool) does not support CUDA graph trees "
    "(torch.compile with mode='reduce-overhead'), which need checkpoints of torch's own allocator; capture "
    "with torch.cuda.graph / torch.cuda.make_graphed_callables, or use torch's allocator";

std::string format_size(uint64_t bytes) {  // as torch's out-of-memory message writes sizes
  char buf[32];
  if (bytes <= 1024) {
    std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(bytes));
  } else if (bytes <= (uint64_t{1} << 20)) {
    std::snprintf(buf, sizeof buf, "%.2f KiB", bytes / 1024.0);
  } else if (bytes <= (uint64_t{1} << 30)) {
    std::snprintf(buf, sizeof buf, "%.2f MiB", bytes / 1048576.0);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / 1073741824.0);
  }
  return buf;
}

[[noreturn]] void raise_out_of_memory(size_t bytes, c10::DeviceIndex device) {
  size_t free_bytes = 0, total = 0;
  {
    c10::cuda::CUDAGuard guard(device);
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) (void)cudaGetLastError();
  }
  const Stats s = device_stats(device).stats;
  const int64_t allocated = s.allocated_bytes[kAllPools].current;
  const int64_t reserved = s.reserved_bytes[kAllPools].current;
  TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory. Tried to allocate ", format_size(bytes), ". GPU ",
                   static_cast<int>(device), " has a total capacity of ", format_size(total), " of which ",
                   format_size(free_bytes), " is free. Of the allocated memory ", format_size(allocated),
                   " is allocated by pyeff's CUDA pool, and ", format_size(reserved - allocated),
                   " is reserved by it but unallocated (held by CUDA graphs' private pools, or cached while a "
                   "graph capture was underway). pyeff.memory.cuda_stats() has the details.");
}

void* allocate_or_raise(size_t bytes, c10::DeviceIndex device, cudaStream_t stream) {
  cudaError_t error = cudaSuccess;
  void* p = allocate(bytes, device, stream, &error);
  if (p == nullptr && bytes != 0) {
    C10_CUDA_CHECK(error);  // not out of memory (e.g. cudaMalloc refused during a capture): torch's CUDA error
    raise_out_of_memory(bytes, device);
  }
  return p;
}

void delete_block(void* ptr) { free(ptr); }

PoolId pool_id(TorchPoolId id) { return {id.first, id.second}; }

void copy_stat(TorchStat& to, const Stat& from) {
  to.current = from.current;
  to.peak = from.peak;
  to.allocated = from.allocated;
  to.freed = from.freed;
}

class PoolAllocator final : public Base {
 public:
  PoolAllocator()
      : Base([](size_t bytes, int device, cudaStream_t stream) { return cuda::allocate(bytes, device, stream); },
             [](void* ptr, size_t, int, cudaStream_t) { cuda::free(ptr); }) {
    set_reset_fn([] {
      TORCH_CHECK(empty_cache(), "torch.cuda.empty_cache() during a CUDA graph capture: pyeff's CUDA pool "
                  "returns no memory while a capture is underway; call it before or after the capture");
    });
    set_memory_fraction_fn([](double fraction, int device) { set_memory_fraction(device, fraction); });
    set_begin_allocate_to_pool([](int device, TorchPoolId id, std::function<bool(cudaStream_t)> filter) {
      begin_allocate_to_pool(device, pool_id(id), std::move(filter));
    });
    set_end_allocate_to_pool_fn([](int device, TorchPoolId id) { end_allocate_to_pool(device, pool_id(id)); });
    set_release_pool([](int device, TorchPoolId id) { release_pool(device, pool_id(id)); });
  }

  c10::DataPtr allocate(size_t bytes) override {
    const c10::DeviceIndex device = c10::cuda::current_device();
    void* p = allocate_or_raise(bytes, device, c10::cuda::getCurrentCUDAStream(device).stream());
    return {p, p, &delete_block, c10::Device(c10::DeviceType::CUDA, device)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_block; }
  void* raw_alloc(size_t bytes) override {
    const c10::DeviceIndex device = c10::cuda::current_device();
    return allocate_or_raise(bytes, device, c10::cuda::getCurrentCUDAStream(device).stream());
  }
  void* raw_alloc_with_stream(size_t bytes, cudaStream_t stream) override {
    return allocate_or_raise(bytes, c10::cuda::current_device(), stream);
  }
  void raw_delete(void* ptr) override { cuda::free(ptr); }

  using Base::recordStream;
  void recordStream(const c10::DataPtr& ptr, c10::cuda::CUDAStream stream) override {
    if (ptr.get() != nullptr) record_stream(ptr.get(), stream.stream(), stream.device_index());
  }

  TorchStats getDeviceStats(c10::DeviceIndex device) override {
    const DeviceStats s = device_stats(device);
    TorchStats out;
    for (int p = 0; p < kNumStatPools; ++p) {
      copy_stat(out.allocation[p], s.stats.allocation[p]);
      copy_stat(out.active[p], s.stats.allocation[p]);
      copy_stat(out.segment[p], s.stats.segment[p]);
      copy_stat(out.allocated_bytes[p], s.stats.allocated_bytes[p]);
      copy_stat(out.active_bytes[p], s.stats.allocated_bytes[p]);
      copy_stat(out.reserved_bytes[p], s.stats.reserved_bytes[p]);
      copy_stat(out.requested_bytes[p], s.stats.requested_bytes[p]);
    }
    out.num_alloc_retries = s.stats.alloc_retries;
    out.num_ooms = s.stats.ooms;
    out.num_sync_all_streams = s.event_syncs;
    out.num_device_alloc = s.stats.os_allocs;
    out.num_device_free = s.stats.os_frees;
    return out;
  }
  void resetAccumulatedStats(c10::DeviceIndex device) override { reset_accumulated_stats(device); }
  void resetPeakStats(c10::DeviceIndex device) override { reset_peak_stats(device); }

  std::shared_ptr<AllocatorState> getCheckpointState(c10::DeviceIndex, TorchPoolId) override {
    TORCH_CHECK(false, kNoGraphTrees);
  }
  c10::cuda::CUDACachingAllocator::CheckpointDelta setCheckpointPoolState(
      c10::DeviceIndex, std::shared_ptr<AllocatorState>) override {
    TORCH_CHECK(false, kNoGraphTrees);
  }
};

std::shared_ptr<PoolAllocator>& installed() {
  static auto* allocator = new std::shared_ptr<PoolAllocator>();  // never destroyed, like torch's
  return *allocator;
}

void install() {
  if (installed()) return;
  auto allocator = std::make_shared<PoolAllocator>();
  torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(allocator);  // raises once torch's is in use
  installed() = allocator;
}

bool is_installed() { return installed() != nullptr; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  m.def("cuda_pool_install() -> ()", &install);
  m.def("cuda_pool_installed() -> bool", &is_installed);
}

}  // namespace pyeff::memory::cuda

#endif  // PYEFF_WITH_CUDA
