// The CUDA pool's rules (NOTE [CUDA pool streams and graphs], csrc/allocator/cuda_pool.h) over the
// host-memory runtime of tests/cpp/fake_cuda/cuda_runtime.h, under AddressSanitizer
// (tests/test_memory_cuda.py builds and runs it): blocks reused on their own stream only; a block
// used by other streams held back until events recorded on them complete; graph captures served from
// private pools that keep their memory, with nothing returned, recorded, queried or waited on while
// a capture is underway and cudaMalloc in relaxed capture mode; the out-of-memory retry, and other
// cudaMalloc errors handed back as they are; the memory fraction; statistics per device; and
// the C functions torch's CUDAPluggableAllocator and ctypes call.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "allocator/cuda_pool.h"
#include "check.h"
#include "cuda_runtime.h"

extern "C" {
void* pyeff_cuda_pool_alloc(size_t size, int device, cudaStream_t stream);
void pyeff_cuda_pool_free(void* ptr, size_t size, int device, cudaStream_t stream);
int pyeff_cuda_pool_empty_cache(void);
void pyeff_cuda_pool_set_max_cached_bytes(int64_t bytes);
int pyeff_cuda_pool_num_stats(void);
const char* pyeff_cuda_pool_stat_name(int i);
int pyeff_cuda_pool_stats(int device, int64_t* out, int n);
void pyeff_cuda_pool_reset_peak_stats(void);
}

namespace cuda = pyeff::memory::cuda;

namespace {

const size_t MiB = size_t{1} << 20;

cudaStream_t stream(uintptr_t id) { return reinterpret_cast<cudaStream_t>(id); }

int64_t stat(int device, const std::string& name) {
  const int n = pyeff_cuda_pool_num_stats();
  std::vector<int64_t> values(n);
  pyeff_cuda_pool_stats(device, values.data(), n);
  for (int i = 0; i < n; ++i)
    if (name == pyeff_cuda_pool_stat_name(i)) return values[i];
  std::fprintf(stderr, "no statistic %s\n", name.c_str());
  ++failures;
  return -1;
}

// Per-stream pools through the C functions, the device restored, statistics per device.
void streams_and_devices() {
  cudaStream_t s1 = stream(0x1000), s2 = stream(0x2000);
  void* a = pyeff_cuda_pool_alloc(4 * MiB, 0, s1);
  void* b = pyeff_cuda_pool_alloc(100, 0, s1);
  CHECK(a != nullptr && b != nullptr && reinterpret_cast<uintptr_t>(b) % 64 == 0);
  CHECK(pyeff_cuda_pool_alloc(0, 0, s1) == nullptr);
  pyeff_cuda_pool_free(a, 4 * MiB, 0, s1);
  void* other = pyeff_cuda_pool_alloc(4 * MiB, 0, s2);  // another stream: not a's block
  CHECK(other != a);
  void* again = pyeff_cuda_pool_alloc(4 * MiB, 0, s1);  // same stream: a's block
  CHECK(again == a);
  void* dev1 = pyeff_cuda_pool_alloc(3 * MiB, 1, s1);
  CHECK(dev1 != nullptr && fake_cuda().device == 0);  // the current device is restored
  CHECK_EQ(stat(0, "allocation.all.current"), 3);
  CHECK_EQ(stat(1, "allocation.all.current"), 1);
  CHECK_EQ(stat(-1, "allocated_bytes.all.current"), 8 * MiB + 128 + 4 * MiB);
  CHECK_EQ(stat(0, "num_cache_hits"), 1);
  for (void* p : {other, again, b, dev1}) pyeff_cuda_pool_free(p, 0, 0, nullptr);  // the block knows its stream
  pyeff_cuda_pool_free(nullptr, 0, 0, s1);
  CHECK_EQ(stat(-1, "allocation.all.current"), 0);
  CHECK(pyeff_cuda_pool_empty_cache() == 1);
  CHECK_EQ(stat(-1, "reserved_bytes.all.current"), 0);
}

// record_stream: the freed block waits for events on the streams that used it.
void record_stream() {
  cudaStream_t s1 = stream(0x1100), s2 = stream(0x2100), s3 = stream(0x3100);
  FakeCuda& f = fake_cuda();
  void* a = cuda::allocate(8 * MiB, 0, s1);
  cuda::record_stream(a, s1, 0);  // its own stream: nothing to wait for
  cuda::free(a);
  CHECK(f.recorded_on(s1) == 0);
  CHECK(cuda::allocate(8 * MiB, 0, s1) == a);

  cuda::record_stream(a, s2, 0);
  cuda::record_stream(a, s2, 0);  // once per stream
  cuda::record_stream(a, s3, 1);  // a stream of another device: its event is made and recorded there
  cuda::free(a);
  CHECK(f.recorded_on(s2) == 1 && f.recorded_on(s3) == 1 && f.device == 0);
  CHECK_EQ(stat(0, "allocation.all.current"), 1);  // not reusable yet
  void* b = cuda::allocate(8 * MiB, 0, s1);
  CHECK(b != a);
  f.finish(s2);
  void* c = cuda::allocate(8 * MiB, 0, s1);
  CHECK(c != a);  // s3 still uses it
  f.finish(s3);
  const int syncs = f.event_syncs;
  void* d = cuda::allocate(8 * MiB, 0, s1);  // the events are polled, not waited on
  CHECK(d == a && f.event_syncs == syncs);
  for (void* p : {b, c, d}) cuda::free(p);
  CHECK(cuda::empty_cache());
  CHECK_EQ(stat(-1, "reserved_bytes.all.current"), 0);
}

// Graph capture: a private pool that keeps its memory, and nothing illegal while capturing.
void graph_capture() {
  cudaStream_t cap = stream(0x1200), side = stream(0x2200), user = stream(0x3200);
  FakeCuda& f = fake_cuda();
  const cuda::PoolId id{7, 0};
  void* before = cuda::allocate(6 * MiB, 0, cap);
  void* used = cuda::allocate(4 * MiB, 0, side);
  cuda::record_stream(used, user, 0);
  cuda::free(before);  // cached on `cap`, outside the graph's pool
  const int mallocs = f.mallocs;

  cuda::begin_allocate_to_pool(0, id, [cap](cudaStream_t s) { return s == cap; });
  f.capturing = true;
  CHECK(cuda::capture_underway());
  // The graph's own memory, not the cached block: a cudaMalloc during a global-mode capture, which
  // CUDA allows only with the thread in relaxed mode; the thread's mode is restored after it.
  cudaError_t error = cudaErrorInvalidValue;
  void* g1 = cuda::allocate(6 * MiB, 0, cap, &error);
  CHECK(g1 != nullptr && g1 != before && f.mallocs == mallocs + 1 && error == cudaSuccess);
  CHECK(fake_thread_capture_mode() == cudaStreamCaptureModeGlobal && f.illegal_in_capture == 0);
  cuda::free(g1);
  void* g2 = cuda::allocate(6 * MiB, 0, cap);  // reused inside the graph's pool
  CHECK(g2 == g1);
  void* out = cuda::allocate(2 * MiB, 0, cap);  // the graph's output: lives on after capture
  void* eager = cuda::allocate(6 * MiB, 0, side);  // another stream: outside the graph
  CHECK(eager != g1 && eager != nullptr);
  cuda::free(g2);
  cuda::free(used);  // used by `user`: no event may be recorded during capture
  CHECK(f.recorded_on(user) == 0);
  const int frees = f.frees;
  pyeff_cuda_pool_set_max_cached_bytes(0);  // the cap waits for the capture's end
  cuda::free(eager);
  CHECK(!cuda::empty_cache() && pyeff_cuda_pool_empty_cache() == 0);
  const size_t limit = f.limit;
  f.limit = f.in_use;  // out of memory inside the capture: nothing may be freed to make room
  CHECK(cuda::allocate(64 * MiB, 0, cap) == nullptr);
  f.limit = limit;
  CHECK(f.frees == frees && f.illegal_in_capture == 0);
  f.capturing = false;
  cuda::end_allocate_to_pool(0, id);

  CHECK(f.frees > frees);  // the cap applies now: the general pools' caches are gone
  CHECK_EQ(stat(0, "cached_bytes.all.current"), 6 * MiB);  // but not the graph's
  pyeff_cuda_pool_set_max_cached_bytes(-1);
  void* next = cuda::allocate(MiB, 0, side);  // records the event deferred during capture
  CHECK(f.recorded_on(user) == 1);
  f.finish(user);
  cuda::free(next);
  CHECK(cuda::empty_cache());
  CHECK_EQ(stat(0, "reserved_bytes.all.current"), 8 * MiB);  // the graph keeps its free memory too

  cuda::begin_allocate_to_pool(0, id, [cap](cudaStream_t s) { return s == cap; });  // a second graph shares it
  void* g3 = cuda::allocate(6 * MiB, 0, cap);
  CHECK(g3 == g1);
  cuda::end_allocate_to_pool(0, id);
  cuda::release_pool(0, id);  // the first graph goes; the second still replays over g1's addresses
  CHECK(cuda::empty_cache());
  CHECK_EQ(stat(0, "reserved_bytes.all.current"), 8 * MiB);
  cuda::free(g3);
  cuda::release_pool(0, id);  // no graph left: its free memory goes at the next empty_cache
  CHECK_EQ(stat(0, "reserved_bytes.all.current"), 8 * MiB);
  CHECK(cuda::empty_cache());
  CHECK_EQ(stat(0, "reserved_bytes.all.current"), 2 * MiB);  // `out` is still alive
  cuda::free(out);
  CHECK(cuda::empty_cache());
  CHECK_EQ(stat(-1, "reserved_bytes.all.current"), 0);
  CHECK(f.illegal_in_capture == 0);
}

// Out of memory: the pool's own cache, then pending events and every pool's cache, then nullptr.
void out_of_memory() {
  cudaStream_t s1 = stream(0x1300), s2 = stream(0x2300), s3 = stream(0x3300);
  FakeCuda& f = fake_cuda();
  void* cached = cuda::allocate(4 * MiB, 0, s2);
  void* waiting = cuda::allocate(4 * MiB, 0, s3);
  cuda::record_stream(waiting, s2, 0);
  cuda::free(cached);
  cuda::free(waiting);  // waits for s2
  cuda::reset_accumulated_stats(-1);
  const int syncs = f.event_syncs;
  f.limit = f.in_use + 2 * MiB;
  void* big = cuda::allocate(10 * MiB, 0, s1);  // only with both other blocks given back
  CHECK(big != nullptr && f.event_syncs == syncs + 1);
  CHECK_EQ(stat(0, "num_alloc_retries"), 1);
  CHECK_EQ(stat(0, "num_ooms"), 0);
  cudaError_t error = cudaErrorInvalidValue;
  CHECK(cuda::allocate(64 * MiB, 0, s1, &error) == nullptr && error == cudaSuccess);
  CHECK_EQ(stat(0, "num_ooms"), 1);  // one failed request counts once
  CHECK(cuda::device_stats(0).event_syncs == 1);
  f.limit = SIZE_MAX;
  // Another cudaMalloc error is handed back as it is: not out of memory, so no retry after waiting
  // for events and no OOM counted.
  void* waiting2 = cuda::allocate(4 * MiB, 0, s3);
  cuda::record_stream(waiting2, s2, 0);
  cuda::free(waiting2);
  f.malloc_error = cudaErrorStreamCaptureUnsupported;
  CHECK(cuda::allocate(64 * MiB, 0, s1, &error) == nullptr && error == cudaErrorStreamCaptureUnsupported);
  f.malloc_error = cudaSuccess;
  CHECK(f.last == cudaSuccess);  // cleared, as torch expects of an allocator
  CHECK_EQ(stat(0, "num_ooms"), 1);
  CHECK(cuda::device_stats(0).event_syncs == 1 && f.recorded_on(s2) == 1);
  f.finish(s2);
  cuda::free(big);
  CHECK(cuda::empty_cache());
}

// torch.cuda.set_per_process_memory_fraction: the device's reserved bytes are capped.
void memory_fraction() {
  FakeCuda& f = fake_cuda();
  const int mallocs = f.mallocs;
  cuda::set_memory_fraction(0, 0.5);
  CHECK(cuda::allocate(f.total / 2 + MiB, 0, stream(0x1400)) == nullptr && f.mallocs == mallocs);
  void* p = cuda::allocate(6 * MiB, 0, stream(0x1400));
  CHECK(p != nullptr);
  cuda::free(p);
  cuda::set_memory_fraction(0, 1.0);
  CHECK(cuda::empty_cache());
}

void statistics() {
  void* p = pyeff_cuda_pool_alloc(3 * MiB, 0, stream(0x1500));
  pyeff_cuda_pool_free(p, 3 * MiB, 0, stream(0x1500));
  CHECK(stat(0, "allocated_bytes.all.peak") >= int64_t(4 * MiB));
  pyeff_cuda_pool_reset_peak_stats();
  CHECK_EQ(stat(-1, "allocated_bytes.all.peak"), 0);
  cuda::reset_accumulated_stats(-1);
  CHECK_EQ(stat(-1, "num_cache_misses"), 0);
  CHECK(cuda::empty_cache());
}

}  // namespace

int main() {
  streams_and_devices();
  record_stream();
  graph_capture();
  out_of_memory();
  memory_fraction();
  statistics();
  FakeCuda& f = fake_cuda();
  CHECK_EQ(stat(-1, "reserved_bytes.all.current"), 0);
  CHECK(f.live.empty() && f.bad_frees == 0 && f.mallocs == f.frees);
  CHECK_EQ(f.illegal_in_capture, 0);
  return report();
}
