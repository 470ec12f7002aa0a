// Standalone checks of the caching pool's core (csrc/allocator/pool.cpp), without torch, meant to
// run under AddressSanitizer/UndefinedBehaviorSanitizer or valgrind (tests/test_memory.py builds
// and runs it; README.md "Memory pool" gives the commands):
//
//   g++ -std=c++17 -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -pthread
//       -Icsrc csrc/allocator/pool.cpp tests/cpp/pool_stress.cpp -o /tmp/pool_stress   (one line)
//   /tmp/pool_stress [threads] [iterations per thread] [seed]
//
// 1. exact statistics after a known sequence; 2. several threads allocating and freeing blocks of
// random sizes (small and large, some freed by another thread), each block filled with a pattern
// of its owner that is checked before it is freed, under a cap that another thread keeps changing,
// with empty_cache() calls in between; 3. at the end nothing is allocated, and after empty_cache()
// nothing is reserved and every mapping was returned. The stress runs twice: over the operating
// system (mmap, any range returned) and over a backend like cudaMalloc (host memory here), which
// only takes back exactly what it handed out and checks that it does.
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "allocator/pool.h"
#include "check.h"

using pyeff::memory::kAllPools;
using pyeff::memory::kLargePool;
using pyeff::memory::kSmallPool;
using pyeff::memory::Pool;
using pyeff::memory::Stats;

namespace {

// Like cudaMalloc/cudaFree: memory is returned only as the whole allocations it was handed out in
// (anything else is counted as a failure), and never resized.
class SegmentBackend final : public pyeff::memory::Backend {
 public:
  void* map(size_t bytes) noexcept override {
    void* p = std::aligned_alloc(4096, bytes);
    if (p != nullptr) {
      std::lock_guard<std::mutex> g(mu_);
      mapped_[p] = bytes;
    }
    return p;
  }
  void unmap(void* ptr, size_t bytes) noexcept override {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = mapped_.find(ptr);
      if (it == mapped_.end() || it->second != bytes) {
        ++bad_unmaps;
        return;
      }
      mapped_.erase(it);
    }
    std::free(ptr);
  }
  bool partial_unmap() const noexcept override { return false; }
  size_t granularity() const noexcept override { return 64 << 10; }
  size_t outstanding() {
    std::lock_guard<std::mutex> g(mu_);
    return mapped_.size();
  }
  std::atomic<int> bad_unmaps{0};

 private:
  std::mutex mu_;
  std::map<void*, size_t> mapped_;
};

void exact_statistics() {
  auto& os = pyeff::memory::os_backend();
  const size_t page = os.granularity();
  pyeff::memory::Options opt;
  Pool pool(os, opt);
  const size_t slab100 = 64 << 10;  // the 128-byte class's slab (64 KiB: >= 8 blocks)

  void* a = pool.allocate(100);  // class 128: new slab (miss)
  void* b = pool.allocate(100);  // carved from the same slab (hit)
  void* c = pool.allocate(1 << 20);  // large: new mapping (miss)
  CHECK(reinterpret_cast<uintptr_t>(a) % 64 == 0 && reinterpret_cast<uintptr_t>(c) % 64 == 0);
  Stats s = pool.stats();
  CHECK_EQ(s.allocated_bytes[kAllPools].current, 128 + 128 + (1 << 20));
  CHECK_EQ(s.requested_bytes[kAllPools].current, 100 + 100 + (1 << 20));
  CHECK_EQ(s.reserved_bytes[kSmallPool].current, slab100);
  CHECK_EQ(s.reserved_bytes[kLargePool].current, 1 << 20);
  CHECK_EQ(s.cached_bytes[kAllPools].current, slab100 - 256);
  CHECK_EQ(s.cached_bytes[kAllPools].peak, slab100 - 128);
  CHECK_EQ(s.allocation[kAllPools].current, 3);
  CHECK_EQ(s.segment[kAllPools].current, 2);
  CHECK_EQ(s.cache_hits, 1);
  CHECK_EQ(s.cache_misses, 2);
  CHECK_EQ(s.os_allocs, 2);

  pool.free(a);
  pool.free(c);
  void* a2 = pool.allocate(70);        // same class: the freed block again
  void* c2 = pool.allocate(1000000);  // best fit: the cached 1 MiB block
  CHECK(a2 == a);
  CHECK(c2 == c);
  s = pool.stats();
  CHECK_EQ(s.cache_hits, 3);
  CHECK_EQ(s.cache_misses, 2);
  CHECK_EQ(s.allocation[kAllPools].allocated, 5);
  CHECK_EQ(s.allocation[kAllPools].freed, 2);
  CHECK_EQ(s.allocated_bytes[kAllPools].peak, 128 + 128 + (1 << 20));
  CHECK_EQ(s.requested_bytes[kAllPools].current, 70 + 100 + 1000000);

  // Much larger than needed: split, the rest stays cached; freed again: merged back.
  pool.free(c2);
  void* d = pool.allocate(50 * page);
  CHECK(d == c);
  s = pool.stats();
  CHECK_EQ(s.reserved_bytes[kLargePool].current, 1 << 20);
  CHECK_EQ(s.allocated_bytes[kLargePool].current, 50 * page);
  CHECK_EQ(s.cache_hits, 4);
  CHECK_EQ(s.segment[kLargePool].current, 1);
  void* d2 = pool.allocate((1 << 20) - 50 * page);  // exactly the rest
  CHECK(reinterpret_cast<char*>(d2) == reinterpret_cast<char*>(d) + 50 * page);
  pool.free(d);
  pool.free(d2);
  // None large enough: the largest free block grows (a resize and a miss, nothing new mapped).
  void* e = pool.allocate(2 << 20);
  s = pool.stats();
  CHECK_EQ(s.reserved_bytes[kLargePool].current, 2 << 20);
  CHECK_EQ(s.os_resizes, 1);
  CHECK_EQ(s.os_allocs, 2);
  CHECK_EQ(s.cache_misses, 3);
  CHECK_EQ(s.segment[kLargePool].current, 1);

  // Three blocks split from one, freed out of order, merge into one block again.
  pool.free(e);
  void* x1 = pool.allocate(640 << 10);
  void* x2 = pool.allocate(640 << 10);
  void* x3 = pool.allocate((2 << 20) - (1280 << 10));
  CHECK(x1 == e);
  CHECK(reinterpret_cast<char*>(x3) == reinterpret_cast<char*>(e) + (1280 << 10));
  pool.free(x1);
  pool.free(x3);
  pool.free(x2);
  void* y = pool.allocate(2 << 20);
  CHECK(y == e);
  s = pool.stats();
  CHECK_EQ(s.cache_hits, 9);
  CHECK_EQ(s.os_allocs, 2);

  // The cap: freeing 2 MiB with a 1 MiB cap returns the block at once.
  pool.set_max_cached_bytes(1 << 20);
  pool.free(y);
  s = pool.stats();
  CHECK_EQ(s.reserved_bytes[kLargePool].current, 0);
  CHECK_EQ(s.segment[kLargePool].current, 0);
  CHECK_EQ(s.os_frees, 1);
  pool.set_max_cached_bytes(SIZE_MAX);

  pool.free(a2);
  pool.free(b);
  pool.reset_peak_stats();
  s = pool.stats();
  CHECK_EQ(s.allocated_bytes[kAllPools].current, 0);
  CHECK_EQ(s.allocated_bytes[kAllPools].peak, 0);
  CHECK_EQ(s.reserved_bytes[kAllPools].peak, slab100);
  pool.empty_cache();
  s = pool.stats();
  CHECK_EQ(s.reserved_bytes[kAllPools].current, 0);
  CHECK_EQ(s.segment[kAllPools].current, 0);
  CHECK_EQ(s.os_allocs, s.os_frees);
  CHECK(pool.allocate(0) == nullptr);
}

struct Live {
  unsigned char* ptr;
  size_t bytes;
  uint32_t tag;
};

// The owner's pattern, written as a word at the start of every 64-byte chunk plus the last byte:
// blocks are 64-byte aligned, so a block overlapping another overwrites one of those.
uint64_t word(const Live& l, size_t i) { return (uint64_t{l.tag} << 32) ^ (i * 0x9E3779B97F4A7C15ull); }

unsigned char last_byte(const Live& l) {
  const size_t j = l.bytes - 1;
  const uint64_t w = word(l, j & ~size_t{7});
  unsigned char bytes[8];
  std::memcpy(bytes, &w, 8);
  return bytes[j & 7];  // what the word covering it would hold, if one does
}

void fill(const Live& l) {
  for (size_t i = 0; i + 8 <= l.bytes; i += 64) {
    const uint64_t w = word(l, i);
    std::memcpy(l.ptr + i, &w, 8);
  }
  l.ptr[l.bytes - 1] = last_byte(l);
}

bool intact(const Live& l) {
  for (size_t i = 0; i + 8 <= l.bytes; i += 64) {
    uint64_t w;
    std::memcpy(&w, l.ptr + i, 8);
    if (w != word(l, i)) return false;
  }
  return l.ptr[l.bytes - 1] == last_byte(l);
}

void stress(pyeff::memory::Backend& backend, const char* label, int threads, int iterations, unsigned seed) {
  pyeff::memory::Options opt;
  opt.max_cached_bytes = 8 << 20;
  Pool pool(backend, opt);
  std::atomic<int> corrupt{0}, misaligned{0}, running{threads};
  std::mutex handoff_mu;
  std::vector<Live> handoff;  // blocks allocated by one thread and freed by another

  auto worker = [&](int id) {
    std::mt19937 rng(seed * 7919u + static_cast<unsigned>(id));
    std::vector<Live> live;
    uint32_t tag = static_cast<uint32_t>(id) << 24;
    auto release = [&](const Live& l) {
      if (!intact(l)) ++corrupt;
      pool.free(l.ptr);
    };
    for (int it = 0; it < iterations; ++it) {
      const unsigned r = live.size() >= 48 ? 60 + rng() % 35 : rng() % 100;
      if (r < 55 || live.empty()) {
        // Mostly small, sometimes large (up to 3 MiB), sometimes exactly a class size or a page.
        size_t bytes;
        const unsigned kind = rng() % 10;
        if (kind < 6) {
          bytes = 1 + rng() % 4096;
        } else if (kind < 8) {
          bytes = 1 + rng() % (256 << 10);
        } else if (kind < 9) {
          bytes = (size_t{1} << (6 + rng() % 12));
        } else {
          bytes = 1 + rng() % (3 << 20);
        }
        auto* p = static_cast<unsigned char*>(pool.allocate(bytes));
        if (p == nullptr || reinterpret_cast<uintptr_t>(p) % 64 != 0) {
          ++misaligned;
          continue;
        }
        Live l{p, bytes, ++tag};
        fill(l);
        if (rng() % 16 == 0) {
          std::lock_guard<std::mutex> g(handoff_mu);
          handoff.push_back(l);
        } else {
          live.push_back(l);
        }
      } else if (r < 95) {
        const size_t i = rng() % live.size();
        release(live[i]);
        live[i] = live.back();
        live.pop_back();
      } else if (r < 98) {
        Live l{nullptr, 0, 0};
        {
          std::lock_guard<std::mutex> g(handoff_mu);
          if (!handoff.empty()) {
            l = handoff.back();
            handoff.pop_back();
          }
        }
        if (l.ptr != nullptr) release(l);
      } else if (r < 99) {
        pool.empty_cache();
      } else {
        pool.set_max_cached_bytes((rng() % 4) == 0 ? 0 : (size_t{1} << (16 + rng() % 10)));
        (void)pool.stats();
      }
    }
    for (const Live& l : live) release(l);
    --running;
  };

  std::vector<std::thread> pool_threads;
  for (int i = 0; i < threads; ++i) pool_threads.emplace_back(worker, i);
  for (auto& t : pool_threads) t.join();
  for (const Live& l : handoff) {
    if (!intact(l)) ++corrupt;
    pool.free(l.ptr);
  }
  CHECK_EQ(corrupt.load(), 0);
  CHECK_EQ(misaligned.load(), 0);
  Stats s = pool.stats();
  CHECK_EQ(s.allocated_bytes[kAllPools].current, 0);
  CHECK_EQ(s.allocation[kAllPools].current, 0);
  CHECK_EQ(s.allocation[kAllPools].allocated, s.allocation[kAllPools].freed);
  CHECK(s.cache_hits > 0 && s.cache_misses > 0);
  pool.empty_cache();
  s = pool.stats();
  CHECK_EQ(s.reserved_bytes[kAllPools].current, 0);
  CHECK_EQ(s.segment[kAllPools].current, 0);
  std::printf("stress over %s: %d threads x %d iterations: %lld allocations, %lld hits, %lld misses, %lld maps, "
              "%lld resizes, peak reserved %lld bytes\n",
              label, threads, iterations, static_cast<long long>(s.allocation[kAllPools].allocated),
              static_cast<long long>(s.cache_hits), static_cast<long long>(s.cache_misses),
              static_cast<long long>(s.os_allocs), static_cast<long long>(s.os_resizes),
              static_cast<long long>(s.reserved_bytes[kAllPools].peak));
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 4;
  const int iterations = argc > 2 ? std::atoi(argv[2]) : 20000;
  const unsigned seed = argc > 3 ? static_cast<unsigned>(std::atoi(argv[3])) : 1u;
  exact_statistics();
  stress(pyeff::memory::os_backend(), "the OS", threads, iterations, seed);
  SegmentBackend segments;
  stress(segments, "whole segments", threads, iterations, seed + 1);
  CHECK_EQ(segments.bad_unmaps.load(), 0);
  CHECK_EQ(segments.outstanding(), 0);
  return report();
}
