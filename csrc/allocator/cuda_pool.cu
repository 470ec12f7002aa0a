// The CUDA pool's host logic (NOTE [CUDA pool streams and graphs] in cuda_pool.h) and the C functions
// that torch.cuda.memory.CUDAPluggableAllocator and ctypes load. Plain CUDA runtime, no torch:
// setup.py compiles it into pyeff._C when torch has CUDA and nvcc exists; tests/test_memory_cuda.py
// links it alone, and compiles it as C++ over tests/cpp/fake_cuda under AddressSanitizer.
#include "allocator/cuda_pool.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#define PYEFF_EXPORT extern "C" __attribute__((visibility("default")))

namespace pyeff::memory::cuda {
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

// One per device, shared by its pools: cudaMalloc / cudaFree, and the cap on reserved bytes.
class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {}
  void* map(size_t bytes) noexcept override {
    if (bytes > limit_ - std::min(limit_, reserved_)) return nullptr;
    DeviceGuard guard(device_);
    void* p = nullptr;
    // torch.cuda.graph captures in cudaStreamCaptureModeGlobal, where cudaMalloc is refused (and the
    // capture invalidated) unless this thread is in relaxed mode; as in torch's own allocator, a
    // captured cudaMalloc is fine: its memory is never freed while the graph may replay.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    const bool exchanged = cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess;
    const cudaError_t status = cudaMalloc(&p, bytes);
    if (exchanged) (void)cudaThreadExchangeStreamCaptureMode(&mode);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();  // clear it, so that torch does not report it later
      if (status != cudaErrorMemoryAllocation) error_ = status;  // not out of memory: reported as is
      return nullptr;
    }
    reserved_ += bytes;
    return p;
  }
  void unmap(void* ptr, size_t bytes) noexcept override {
    DeviceGuard guard(device_);
    (void)cudaFree(ptr);
    reserved_ -= bytes;
  }
  bool partial_unmap() const noexcept override { return false; }
  // cudaMalloc hands out 2 MiB pages; large blocks are rounded to them.
  size_t granularity() const noexcept override { return size_t{2} << 20; }
  void set_limit(size_t bytes) { limit_ = bytes; }
  // The latest cudaMalloc error other than out of memory since the last call; cudaSuccess if none.
  cudaError_t take_error() { return std::exchange(error_, cudaSuccess); }

 private:
  int device_;
  size_t reserved_ = 0;  // every call comes under the registry's lock
  size_t limit_ = SIZE_MAX;
  cudaError_t error_ = cudaSuccess;
};

Options cuda_options(size_t max_cached_bytes) {
  Options o;
  o.small_max = size_t{1} << 20;  // up to 1 MiB from slabs of at least 2 MiB
  o.min_slab = size_t{2} << 20;
  o.max_cached_bytes = max_cached_bytes;
  return o;
}

using StreamPools = std::map<cudaStream_t, std::unique_ptr<Pool>>;

struct PrivatePool {  // a graph's memory
  int users = 1;      // captures begun on it and graphs alive that use it
  StreamPools pools;
};

struct Device {
  explicit Device(int index) : backend(index) {}
  CudaBackend backend;
  StreamPools general;
  std::map<PoolId, PrivatePool> privates;
  std::vector<std::pair<PoolId, StreamFilter>> routes;  // captures underway, the latest last
  std::vector<cudaEvent_t> idle_events;
  int64_t ooms = 0;
  int64_t event_syncs = 0;
};

struct Block {  // a live allocation
  Pool* pool;
  int device;
  cudaStream_t stream;
  std::vector<std::pair<cudaStream_t, int>> uses;  // other streams (and their devices) that used it
  int pending_events = 0;
  bool freed = false;  // by its owner; it waits for the events of its uses
};

struct Pending {
  cudaEvent_t event;
  int device;  // the event's
  void* ptr;
};

struct Registry {
  std::mutex mu;
  std::map<int, std::unique_ptr<Device>> devices;
  std::unordered_map<void*, Block> live;
  std::deque<Pending> pending;  // events recorded on the streams that used a freed block
  std::vector<void*> deferred;  // freed during a capture with uses: no event may be recorded yet
  int captures = 0;             // begin_allocate_to_pool calls not yet ended, every device
  size_t max_cached = SIZE_MAX;
};

// Never destroyed: torch may free blocks during static destruction.
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

template <class F>
void for_each_pool(Device& dev, F&& f) {
  for (auto& [stream, pool] : dev.general) f(*pool);
  for (auto& [id, pp] : dev.privates)
    for (auto& [stream, pool] : pp.pools) f(*pool);
}

// Nothing goes back to the driver during a capture. (A private pool has no cap, and release_caches
// skips it while a graph uses it.)
void apply_holds(Registry& r) {
  for (auto& [index, dev] : r.devices) for_each_pool(*dev, [&](Pool& pool) { pool.set_hold(r.captures > 0); });
}

Device& device_of(Registry& r, int index) {
  auto& slot = r.devices[index];
  if (!slot) slot = std::make_unique<Device>(index);
  return *slot;
}

Pool& pool_in(Registry& r, Device& dev, StreamPools& pools, cudaStream_t stream, bool is_private) {
  auto& slot = pools[stream];
  if (!slot) {
    slot = std::make_unique<Pool>(dev.backend, cuda_options(is_private ? SIZE_MAX : r.max_cached));
    slot->set_hold(r.captures > 0);
  }
  return *slot;
}

// The pool an allocation on `stream` comes from: the latest capture's whose filter takes the stream.
Pool& route(Registry& r, Device& dev, cudaStream_t stream) {
  for (auto it = dev.routes.rbegin(); it != dev.routes.rend(); ++it) {
    if (it->second(stream)) return pool_in(r, dev, dev.privates[it->first].pools, stream, true);
  }
  return pool_in(r, dev, dev.general, stream, false);
}

void release_block(Registry& r, std::unordered_map<void*, Block>::iterator it) {
  it->second.pool->free(it->first);
  r.live.erase(it);
}

cudaEvent_t new_event(Registry& r, int device) {
  Device& dev = device_of(r, device);
  if (!dev.idle_events.empty()) {
    cudaEvent_t e = dev.idle_events.back();
    dev.idle_events.pop_back();
    return e;
  }
  DeviceGuard guard(device);
  cudaEvent_t e = nullptr;
  if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) != cudaSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  return e;
}

// An event on each stream that used the freed block `ptr`; the block waits for all of them.
void insert_events(Registry& r, void* ptr, Block& b) {
  for (auto [stream, device] : b.uses) {
    cudaEvent_t e = new_event(r, device);
    DeviceGuard guard(device);
    if (e == nullptr || cudaEventRecord(e, stream) != cudaSuccess) {
      // No event to wait for: wait for the stream itself, so that the block is never reused early.
      (void)cudaGetLastError();
      (void)cudaStreamSynchronize(stream);
      if (e != nullptr) device_of(r, device).idle_events.push_back(e);
      continue;
    }
    r.pending.push_back({e, device, ptr});
    ++b.pending_events;
  }
  b.uses.clear();
  if (b.pending_events == 0) release_block(r, r.live.find(ptr));
}

void insert_deferred_events(Registry& r) {
  for (void* ptr : r.deferred) insert_events(r, ptr, r.live.at(ptr));
  r.deferred.clear();
}

void complete(Registry& r, const Pending& p) {
  device_of(r, p.device).idle_events.push_back(p.event);
  auto it = r.live.find(p.ptr);
  if (--it->second.pending_events == 0) release_block(r, it);
}

// Blocks whose uses have all completed go back to their pools (no capture may be underway).
void process_events(Registry& r) {
  insert_deferred_events(r);
  for (auto it = r.pending.begin(); it != r.pending.end();) {
    DeviceGuard guard(it->device);
    const cudaError_t status = cudaEventQuery(it->event);
    if (status == cudaErrorNotReady) {
      (void)cudaGetLastError();
      ++it;
      continue;
    }
    if (status != cudaSuccess) (void)cudaGetLastError();  // a broken context: nothing will run anymore
    const Pending p = *it;
    it = r.pending.erase(it);
    complete(r, p);
  }
}

// Waits for every pending event (no capture may be underway).
void synchronize_events(Registry& r) {
  insert_deferred_events(r);
  if (r.pending.empty()) return;
  for (auto& [index, dev] : r.devices) ++dev->event_syncs;
  while (!r.pending.empty()) {
    const Pending p = r.pending.front();
    r.pending.pop_front();
    DeviceGuard guard(p.device);
    if (cudaEventSynchronize(p.event) != cudaSuccess) (void)cudaGetLastError();
    complete(r, p);
  }
}

// The free memory of the device's pools outside graphs and of the private pools no graph uses.
void release_caches(Device& dev) {
  for (auto& [stream, pool] : dev.general) pool->empty_cache();
  for (auto it = dev.privates.begin(); it != dev.privates.end();) {
    PrivatePool& pp = it->second;
    if (pp.users > 0) {
      ++it;
      continue;
    }
    for (auto p = pp.pools.begin(); p != pp.pools.end();) {
      p->second->empty_cache();
      p = p->second->totals().second == 0 ? pp.pools.erase(p) : std::next(p);
    }
    it = pp.pools.empty() ? dev.privates.erase(it) : std::next(it);
  }
}

}  // namespace

void* allocate(size_t bytes, int device, cudaStream_t stream, cudaError_t* error) {
  if (error != nullptr) *error = cudaSuccess;
  if (bytes == 0) return nullptr;
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  Device& dev = device_of(r, device);
  if (r.captures == 0) process_events(r);
  Pool& pool = route(r, dev, stream);
  (void)dev.backend.take_error();
  void* p = pool.allocate(bytes);  // on failure it has returned its own cache and tried again
  cudaError_t status = dev.backend.take_error();
  if (p == nullptr && status == cudaSuccess && r.captures == 0) {
    synchronize_events(r);
    release_caches(dev);
    p = pool.allocate(bytes);
    status = dev.backend.take_error();
  }
  if (p == nullptr) {
    if (status != cudaSuccess) {  // cudaMalloc failed for another reason than memory: no OOM
      if (error != nullptr) *error = status;
      return nullptr;
    }
    ++dev.ooms;
    return nullptr;
  }
  r.live.emplace(p, Block{&pool, device, stream, {}, 0, false});
  return p;
}

void free(void* ptr) {
  if (ptr == nullptr) return;
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  auto it = r.live.find(ptr);
  if (it == r.live.end() || it->second.freed) {
    std::fprintf(stderr, "pyeff CUDA pool: free of %p, which is not an allocated block (double free?)\n", ptr);
    std::abort();
  }
  Block& b = it->second;
  if (b.uses.empty()) {
    release_block(r, it);
    return;
  }
  b.freed = true;
  if (r.captures > 0) {
    r.deferred.push_back(ptr);
  } else {
    insert_events(r, ptr, b);
  }
}

void record_stream(void* ptr, cudaStream_t stream, int stream_device) {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  auto it = r.live.find(ptr);
  if (it == r.live.end() || it->second.freed) return;  // not one of ours (or zero bytes)
  Block& b = it->second;
  if (stream == b.stream && stream_device == b.device) return;  // ordered on its own stream already
  const std::pair<cudaStream_t, int> use{stream, stream_device};
  if (std::find(b.uses.begin(), b.uses.end(), use) == b.uses.end()) b.uses.push_back(use);
}

void begin_allocate_to_pool(int device, PoolId id, StreamFilter filter) {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  Device& dev = device_of(r, device);
  auto [it, created] = dev.privates.try_emplace(id);
  if (!created) ++it->second.users;  // another capture into the same pool (graph.pool())
  dev.routes.emplace_back(id, std::move(filter));
  ++r.captures;
  apply_holds(r);
}

void end_allocate_to_pool(int device, PoolId id) {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  Device& dev = device_of(r, device);
  for (auto it = dev.routes.rbegin(); it != dev.routes.rend(); ++it) {
    if (it->first == id) {
      dev.routes.erase(std::next(it).base());
      --r.captures;
      break;
    }
  }
  apply_holds(r);
}

void release_pool(int device, PoolId id) {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  Device& dev = device_of(r, device);
  auto it = dev.privates.find(id);
  if (it != dev.privates.end() && it->second.users > 0) --it->second.users;
  apply_holds(r);
}

bool capture_underway() {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  return r.captures > 0;
}

bool empty_cache() {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  if (r.captures > 0) return false;
  synchronize_events(r);
  for (auto& [index, dev] : r.devices) release_caches(*dev);
  return true;
}

void set_max_cached_bytes(size_t bytes) {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  r.max_cached = bytes;
  for (auto& [index, dev] : r.devices)
    for (auto& [stream, pool] : dev->general) pool->set_max_cached_bytes(bytes);
}

void set_memory_fraction(int device, double fraction) {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  size_t free_bytes = 0, total = 0;
  {
    DeviceGuard device_guard(device);
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
  }
  device_of(r, device).backend.set_limit(static_cast<size_t>(fraction * static_cast<double>(total)));
}

DeviceStats device_stats(int device) {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  DeviceStats out;
  for (auto& [index, dev] : r.devices) {
    if (device >= 0 && index != device) continue;
    for_each_pool(*dev, [&](Pool& pool) {
      accumulate(out.stats, pool.stats());
      ++out.pools;
    });
    out.event_syncs += dev->event_syncs;
  }
  // A request counts once as out of memory, not once per pool it tried.
  out.stats.ooms = 0;
  for (auto& [index, dev] : r.devices)
    if (device < 0 || index == device) out.stats.ooms += dev->ooms;
  return out;
}

void reset_peak_stats(int device) {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  for (auto& [index, dev] : r.devices)
    if (device < 0 || index == device) for_each_pool(*dev, [](Pool& pool) { pool.reset_peak_stats(); });
}

void reset_accumulated_stats(int device) {
  Registry& r = registry();
  std::lock_guard<std::mutex> guard(r.mu);
  for (auto& [index, dev] : r.devices) {
    if (device >= 0 && index != device) continue;
    for_each_pool(*dev, [](Pool& pool) { pool.reset_accumulated_stats(); });
    dev->ooms = dev->event_syncs = 0;
  }
}

}  // namespace pyeff::memory::cuda

namespace cuda = pyeff::memory::cuda;

PYEFF_EXPORT void* pyeff_cuda_pool_alloc(size_t size, int device, cudaStream_t stream) {
  return cuda::allocate(size, device, stream);
}

PYEFF_EXPORT void pyeff_cuda_pool_free(void* ptr, size_t /*size*/, int /*device*/, cudaStream_t /*stream*/) {
  cuda::free(ptr);  // the block knows its device and stream
}

// 1, or 0 when a graph capture is underway (nothing is returned then).
PYEFF_EXPORT int pyeff_cuda_pool_empty_cache(void) { return cuda::empty_cache() ? 1 : 0; }

// Cap on cached bytes of each (device, stream) pool; -1: none.
PYEFF_EXPORT void pyeff_cuda_pool_set_max_cached_bytes(int64_t bytes) {
  cuda::set_max_cached_bytes(bytes < 0 ? SIZE_MAX : static_cast<size_t>(bytes));
}

PYEFF_EXPORT int pyeff_cuda_pool_num_stats(void) { return static_cast<int>(pyeff::memory::stat_names().size()); }

PYEFF_EXPORT const char* pyeff_cuda_pool_stat_name(int i) {
  const auto& names = pyeff::memory::stat_names();
  return i >= 0 && static_cast<size_t>(i) < names.size() ? names[i].c_str() : nullptr;
}

// Fills out[0..n) with the statistics of `device` (< 0: all devices), summed over its pools;
// returns the number of pools.
PYEFF_EXPORT int pyeff_cuda_pool_stats(int device, int64_t* out, int n) {
  const cuda::DeviceStats s = cuda::device_stats(device);
  const auto values = pyeff::memory::flatten(s.stats);
  for (int i = 0; i < n; ++i) out[i] = static_cast<size_t>(i) < values.size() ? values[i] : 0;
  return s.pools;
}

PYEFF_EXPORT void pyeff_cuda_pool_reset_peak_stats(void) { cuda::reset_peak_stats(-1); }
