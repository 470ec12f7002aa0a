#pragma once
// The caching pool (NOTE [caching pool] in pool.h) over cudaMalloc, with torch's CUDA allocator
// contract: plain CUDA runtime, no torch, so that tests/cpp/cuda_pool_test.cpp runs every rule below
// over a host-memory stand-in for the runtime. csrc/allocator/cuda_allocator.cpp makes it torch's
// CUDA allocator (pyeff.memory.use_cuda_pool); the C functions at the end of cuda_pool.cu serve
// torch.cuda.memory.CUDAPluggableAllocator (a torch.cuda.MemPool's segments) and ctypes.
//
// NOTE [CUDA pool streams and graphs]
// Stream order. A block may be reused without synchronization only by work ordered after its last
// use, i.e. on the stream it was allocated for. So there is one pool per (device, stream) and memory
// never migrates between streams. A block that other streams used (Tensor.record_stream, as DDP's
// NCCL stream does) is not reused when it is freed: an event is recorded on each of those streams,
// and the block goes back to its pool once every event has completed, found by polling at later
// allocations, or by waiting on them when memory runs out or the cache is emptied. This is
// torch's own scheme (CUDACachingAllocator.cpp).
// Graph capture. torch.cuda.graph calls begin_allocate_to_pool(device, id, filter) before capture
// and end_allocate_to_pool after it: meanwhile every allocation whose stream the filter accepts comes
// from the private pool `id` (again one pool per stream), whose memory is never returned while a
// graph may replay over its addresses. release_pool (the graph is destroyed) drops one user of the
// pool; with none left its free memory goes back at the next empty_cache() or out-of-memory retry.
// While any capture is underway, no memory goes back to the driver (cudaFree is illegal during
// capture and would sync the device), no event is queried, recorded or waited on: blocks freed with
// other streams' uses wait, as in torch, until the capture has ended; the cap on cached bytes and
// empty_cache() wait too (empty_cache() refuses).
// cudaMalloc runs with the thread in cudaStreamCaptureModeRelaxed, as in torch's allocator: torch
// captures in global mode, which otherwise refuses it and invalidates the capture.
// Out of memory: when cudaMalloc fails, the pool returns its own cache and tries again; then (no
// capture underway) the device waits for pending events, returns the cache of every pool on the
// device, and tries once more. A request that still fails returns nullptr (the torch glue raises
// torch.OutOfMemoryError). A cudaMalloc error other than cudaErrorMemoryAllocation is not out of
// memory: allocate() hands it back (the glue raises it as torch raises CUDA errors).
// Every function here takes one lock: allocations are serialized, as with torch's allocator per device.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>

#include "allocator/pool.h"

namespace pyeff::memory::cuda {

using PoolId = std::pair<unsigned long long, unsigned long long>;  // torch's c10::cuda::MempoolId_t
using StreamFilter = std::function<bool(cudaStream_t)>;

// A 64-byte aligned block for work on `stream`; nullptr for 0 bytes or when out of memory, or when
// cudaMalloc failed otherwise: then *error (when given) is its error, else cudaSuccess.
void* allocate(size_t bytes, int device, cudaStream_t stream, cudaError_t* error = nullptr);
// nullptr is ignored; a pointer that is not a live block aborts (a double free).
void free(void* ptr);
// `ptr` (a live block) is used by work on `stream` of device `stream_device` too.
void record_stream(void* ptr, cudaStream_t stream, int stream_device);

void begin_allocate_to_pool(int device, PoolId id, StreamFilter filter);
void end_allocate_to_pool(int device, PoolId id);
void release_pool(int device, PoolId id);
bool capture_underway();

// Returns the free memory of every pool that may return it; false (nothing done) during a capture.
bool empty_cache();
// Cap on the cached bytes of each (device, stream) pool outside graphs; SIZE_MAX: none.
void set_max_cached_bytes(size_t bytes);
// At most `fraction` of the device's memory reserved (torch.cuda.set_per_process_memory_fraction).
void set_memory_fraction(int device, double fraction);

struct DeviceStats {
  Stats stats;  // summed over the device's pools; ooms: requests that failed after every retry
  int64_t event_syncs = 0;  // times the pool waited for all pending events (torch's num_sync_all_streams)
  int pools = 0;
};
DeviceStats device_stats(int device);  // device < 0: every device
void reset_peak_stats(int device);     // device < 0: every device
void reset_accumulated_stats(int device);

}  // namespace pyeff::memory::cuda
