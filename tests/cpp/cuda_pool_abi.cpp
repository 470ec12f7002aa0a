// The C functions of csrc/allocator/cuda_pool.cu, as torch's CUDAPluggableAllocator calls them, run
// over the host-memory stand-in tests/cpp/fake_cuda/cuda_runtime.h (tests/test_memory_cuda.py
// builds this with AddressSanitizer): one pool per (device, stream), blocks reused on their own
// stream only, statistics per device, the cache returned on cudaMalloc failure and on request, and
// cudaFree only ever given what cudaMalloc returned.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "check.h"
#include "cuda_runtime.h"

extern "C" {
void* pyeff_cuda_pool_alloc(size_t size, int device, cudaStream_t stream);
void pyeff_cuda_pool_free(void* ptr, size_t size, int device, cudaStream_t stream);
void pyeff_cuda_pool_empty_cache(void);
void pyeff_cuda_pool_set_max_cached_bytes(int64_t bytes);
int pyeff_cuda_pool_num_stats(void);
const char* pyeff_cuda_pool_stat_name(int i);
int pyeff_cuda_pool_stats(int device, int64_t* out, int n);
void pyeff_cuda_pool_reset_peak_stats(void);
}

namespace {

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

}  // namespace

int main() {
  auto* s1 = reinterpret_cast<cudaStream_t>(uintptr_t{0x1000});
  auto* s2 = reinterpret_cast<cudaStream_t>(uintptr_t{0x2000});
  const size_t MiB = size_t{1} << 20;

  void* a = pyeff_cuda_pool_alloc(4 * MiB, 0, s1);
  void* b = pyeff_cuda_pool_alloc(100, 0, s1);
  CHECK(a != nullptr && b != nullptr && reinterpret_cast<uintptr_t>(b) % 64 == 0);
  pyeff_cuda_pool_free(a, 4 * MiB, 0, s1);
  void* other = pyeff_cuda_pool_alloc(4 * MiB, 0, s2);  // another stream: not a's block
  CHECK(other != a);
  void* again = pyeff_cuda_pool_alloc(4 * MiB, 0, s1);  // same stream: a's block
  CHECK(again == a);
  void* dev1 = pyeff_cuda_pool_alloc(3 * MiB, 1, s1);
  CHECK(dev1 != nullptr && fake_cuda().device == 0);  // the current device is restored
  CHECK(stat(0, "allocation.all.current") == 3);
  CHECK(stat(1, "allocation.all.current") == 1);
  CHECK(stat(-1, "allocated_bytes.all.current") == int64_t(8 * MiB + 128 + 4 * MiB));
  CHECK(stat(0, "num_cache_hits") == 1);

  // A free naming the wrong stream still finds the block's pool.
  pyeff_cuda_pool_free(other, 4 * MiB, 0, s1);
  CHECK(stat(0, "allocation.all.current") == 2);

  // cudaMalloc failing: the pool returns its cache and tries again.
  const int frees = fake_cuda().frees;
  fake_cuda().limit = fake_cuda().in_use + 2 * MiB;  // room for 2 MiB; 4 MiB are cached on s2
  void* big = pyeff_cuda_pool_alloc(6 * MiB, 0, s2);
  CHECK(big != nullptr && fake_cuda().frees == frees + 1);
  void* none = pyeff_cuda_pool_alloc(64 * MiB, 0, s2);
  CHECK(none == nullptr && stat(0, "num_ooms") == 2);  // failed before and after the other caches went
  // ... and another stream's cache is returned when its own is not enough.
  pyeff_cuda_pool_free(again, 4 * MiB, 0, s1);
  fake_cuda().limit = fake_cuda().in_use;  // full: only s1's cached 4 MiB can make room
  again = pyeff_cuda_pool_alloc(3 * MiB, 0, s2);
  CHECK(again != nullptr && stat(0, "reserved_bytes.all.current") == int64_t(6 * MiB + 4 * MiB + (2 * MiB)));
  fake_cuda().limit = SIZE_MAX;

  // The cap, then empty_cache: everything free goes back.
  pyeff_cuda_pool_set_max_cached_bytes(0);
  pyeff_cuda_pool_free(big, 6 * MiB, 0, s2);
  CHECK(stat(0, "cached_bytes.large_pool.current") == 0);
  pyeff_cuda_pool_set_max_cached_bytes(-1);
  pyeff_cuda_pool_free(again, 3 * MiB, 0, s2);
  pyeff_cuda_pool_free(b, 100, 0, s1);
  pyeff_cuda_pool_free(dev1, 3 * MiB, 1, s1);
  pyeff_cuda_pool_free(nullptr, 0, 0, s1);
  CHECK(stat(-1, "allocation.all.current") == 0);
  pyeff_cuda_pool_reset_peak_stats();
  CHECK(stat(-1, "allocated_bytes.all.peak") == 0);
  pyeff_cuda_pool_empty_cache();
  CHECK(stat(-1, "reserved_bytes.all.current") == 0);
  CHECK(fake_cuda().live.empty() && fake_cuda().bad_frees == 0);
  CHECK(fake_cuda().mallocs == fake_cuda().frees);
  return report();
}
