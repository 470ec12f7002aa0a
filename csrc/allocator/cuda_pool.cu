// The caching pool (NOTE [caching pool] in pool.h) over cudaMalloc, as the C functions that
// torch.cuda.memory.CUDAPluggableAllocator loads (pyeff/memory/_cuda.py): plain CUDA runtime, no
// torch. setup.py compiles it into pyeff._C when torch has CUDA and nvcc exists, and the pluggable
// allocator is pointed at that file; tests/test_memory_cuda.py compile-checks it and links it alone.
//
// NOTE [CUDA pool streams]
// A block may be reused without synchronization only by work ordered after its last use, i.e. on
// the stream it was allocated for (torch passes that stream to free()). So there is one pool per
// (device, stream); memory never migrates between streams, and cudaFree (returning memory) waits
// for the device. Statistics of a device add up its streams' pools (peaks: the sum of the pools'
// peaks, exact with one stream).
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "allocator/pool.h"

#define PYEFF_EXPORT extern "C" __attribute__((visibility("default")))

namespace pyeff::memory {
namespace {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device && cudaSetDevice(device) == cudaSuccess) {
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
  bool restore_ = false;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {}
  void* map(size_t bytes) noexcept override {
    DeviceGuard guard(device_);
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
      (void)cudaGetLastError();  // clear it, so that torch does not report it later
      return nullptr;
    }
    return p;
  }
  void unmap(void* ptr, size_t /*bytes*/) noexcept override {
    DeviceGuard guard(device_);
    (void)cudaFree(ptr);
  }
  bool partial_unmap() const noexcept override { return false; }
  // cudaMalloc hands out 2 MiB pages; large blocks are rounded to them.
  size_t granularity() const noexcept override { return size_t{2} << 20; }

 private:
  int device_;
};

struct StreamPool {
  explicit StreamPool(int device, Options options) : backend(device), pool(backend, options) {}
  CudaBackend backend;
  Pool pool;
};

Options cuda_options(size_t max_cached_bytes) {
  Options o;
  o.small_max = size_t{1} << 20;  // up to 1 MiB from slabs of at least 2 MiB
  o.min_slab = size_t{2} << 20;
  o.max_cached_bytes = max_cached_bytes;
  return o;
}

std::mutex pools_mu;
// Never destroyed: torch may free blocks during static destruction.
auto& pools = *new std::map<std::pair<int, uintptr_t>, std::unique_ptr<StreamPool>>();
size_t max_cached = SIZE_MAX;  // per (device, stream) pool

Pool& pool_for(int device, cudaStream_t stream) {
  std::lock_guard<std::mutex> guard(pools_mu);
  auto& slot = pools[{device, reinterpret_cast<uintptr_t>(stream)}];
  if (!slot) slot = std::make_unique<StreamPool>(device, cuda_options(max_cached));
  return slot->pool;
}

std::vector<Pool*> pools_of(int device) {  // device < 0: every device
  std::lock_guard<std::mutex> guard(pools_mu);
  std::vector<Pool*> out;
  for (auto& [key, p] : pools)
    if (device < 0 || key.first == device) out.push_back(&p->pool);
  return out;
}

}  // namespace
}  // namespace pyeff::memory

using pyeff::memory::Pool;

PYEFF_EXPORT void* pyeff_cuda_pool_alloc(size_t size, int device, cudaStream_t stream) {
  Pool& pool = pyeff::memory::pool_for(device, stream);
  void* p = pool.allocate(size);  // on failure it has returned its own cache and tried again
  if (p == nullptr && size != 0) {
    // Out of memory: the other streams' caches on this device go back too, then one more try.
    for (Pool* other : pyeff::memory::pools_of(device)) other->empty_cache();
    p = pool.allocate(size);
  }
  return p;
}

PYEFF_EXPORT void pyeff_cuda_pool_free(void* ptr, size_t /*size*/, int device, cudaStream_t stream) {
  if (ptr == nullptr) return;
  Pool& pool = pyeff::memory::pool_for(device, stream);
  if (!pool.owns(ptr)) {  // not the stream it was allocated for: find its pool (else free() aborts)
    for (Pool* other : pyeff::memory::pools_of(device)) {
      if (other->owns(ptr)) {
        other->free(ptr);
        return;
      }
    }
  }
  pool.free(ptr);
}

PYEFF_EXPORT void pyeff_cuda_pool_empty_cache(void) {
  for (Pool* p : pyeff::memory::pools_of(-1)) p->empty_cache();
}

// Cap on cached bytes of each (device, stream) pool; -1: none.
PYEFF_EXPORT void pyeff_cuda_pool_set_max_cached_bytes(int64_t bytes) {
  const size_t cap = bytes < 0 ? SIZE_MAX : static_cast<size_t>(bytes);
  {
    std::lock_guard<std::mutex> guard(pyeff::memory::pools_mu);
    pyeff::memory::max_cached = cap;
  }
  for (Pool* p : pyeff::memory::pools_of(-1)) p->set_max_cached_bytes(cap);
}

PYEFF_EXPORT int pyeff_cuda_pool_num_stats(void) { return static_cast<int>(pyeff::memory::stat_names().size()); }

PYEFF_EXPORT const char* pyeff_cuda_pool_stat_name(int i) {
  const auto& names = pyeff::memory::stat_names();
  return i >= 0 && static_cast<size_t>(i) < names.size() ? names[i].c_str() : nullptr;
}

// Fills out[0..n) with the statistics of `device` (< 0: all devices), summed over its streams' pools;
// returns the number of pools.
PYEFF_EXPORT int pyeff_cuda_pool_stats(int device, int64_t* out, int n) {
  const auto pools = pyeff::memory::pools_of(device);
  for (int i = 0; i < n; ++i) out[i] = 0;
  for (Pool* p : pools) {
    const auto values = pyeff::memory::flatten(p->stats());
    for (int i = 0; i < n && static_cast<size_t>(i) < values.size(); ++i) out[i] += values[i];
  }
  return static_cast<int>(pools.size());
}

PYEFF_EXPORT void pyeff_cuda_pool_reset_peak_stats(void) {
  for (Pool* p : pyeff::memory::pools_of(-1)) p->reset_peak_stats();
}
