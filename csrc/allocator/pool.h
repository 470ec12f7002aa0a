#pragma once
// pyeff's caching memory pool: the allocator core, independent of torch (and of CUDA), so that it
// backs both the CPU allocator (csrc/allocator/cpu_allocator.cpp) and the CUDA pluggable allocator
// (csrc/allocator/cuda_pool.cu), and builds alone for the sanitizer stress test
// (tests/cpp/pool_stress.cpp).
//
// NOTE [caching pool]
// Memory comes from a Backend (mmap on the CPU, cudaMalloc on a GPU) and is handed out in blocks,
// always 64-byte aligned:
// - small requests (<= Options::small_max) are rounded up to a size class (multiples of 64 bytes up
//   to 1 KiB, then four classes per power of two) and carved from slabs, each slab holding blocks of
//   one class; a freed block goes to its class's free list (last freed, first reused);
// - large requests are rounded up to the backend's granularity (a page) and served by best fit: the
//   smallest free block that is large enough, split when the rest is worth keeping (larger than
//   small_max). A freed large block merges with free neighbours, so memory freed in pieces serves
//   a larger request later. When no free block is large enough, the largest one is grown where the
//   backend can resize mappings without copying (mremap on Linux: its resident pages are reused and
//   only the difference is new), else a new mapping is made.
// Freed memory stays mapped (a cache: no page faults when it is used again) while the cached bytes
// (reserved minus allocated) stay within max_cached_bytes; beyond that, free blocks go back to the
// backend, least recently freed first, and empty_cache() returns all of them. On the CPU any range
// can be returned and neighbouring mappings merge; where the backend can only free what one map()
// returned (cudaMalloc), blocks merge within their segment and only whole free segments are
// returned. The pool never reads or writes the memory it hands out (device memory must not be
// touched from the host): its bookkeeping lives apart. One mutex guards the pool.

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace pyeff::memory {

// Where a pool's memory comes from. map() and resize() return nullptr on failure.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual void* map(size_t bytes) noexcept = 0;
  // With partial_unmap(), any granularity-aligned range of mapped memory, even one spanning
  // neighbouring mappings; without, exactly what one map() returned.
  virtual void unmap(void* ptr, size_t bytes) noexcept = 0;
  virtual bool partial_unmap() const noexcept = 0;
  // Resize a range of mapped memory, keeping its contents and resident pages (it may move); nullptr
  // when not supported or failed, the memory then being unchanged.
  virtual void* resize(void* /*ptr*/, size_t /*old_bytes*/, size_t /*new_bytes*/) noexcept { return nullptr; }
  virtual bool can_resize() const noexcept { return false; }
  // Large blocks are rounded up to a multiple of this (a power of two, at least 64).
  virtual size_t granularity() const noexcept = 0;
};

// Anonymous memory from the operating system (mmap/munmap/mremap; aligned malloc where there is no
// mmap).
Backend& os_backend();

struct Options {
  size_t small_max = size_t{128} << 10;  // requests up to this many bytes use size classes
  size_t min_slab = size_t{64} << 10;    // smallest slab; a slab holds at least 8 blocks
  size_t max_cached_bytes = SIZE_MAX;    // cap on free memory kept (reserved - allocated)
};

// Statistics shaped like torch.cuda.memory_stats(): for each kind (bytes allocated / requested /
// reserved / cached, number of allocations / segments) and each pool (all, small, large), the
// current value, its peak, and the totals allocated and freed since the last reset; then counters.
enum StatPool : int { kAllPools = 0, kSmallPool = 1, kLargePool = 2, kNumStatPools = 3 };

struct Stat {
  int64_t current = 0, peak = 0, allocated = 0, freed = 0;
  void increase(int64_t n) {
    current += n;
    allocated += n;
    if (current > peak) peak = current;
  }
  void decrease(int64_t n) {
    current -= n;
    freed += n;
  }
};

struct Stats {
  Stat allocated_bytes[kNumStatPools];  // bytes of blocks handed out (size classes, rounded sizes)
  Stat requested_bytes[kNumStatPools];  // bytes asked for
  Stat reserved_bytes[kNumStatPools];   // bytes mapped from the backend
  Stat cached_bytes[kNumStatPools];     // reserved - allocated: free memory held (current, peak)
  Stat allocation[kNumStatPools];       // number of blocks handed out
  Stat segment[kNumStatPools];          // slabs; runs of adjacent large blocks (mappings, once merged)
  int64_t cache_hits = 0;    // requests served without asking the backend for memory
  int64_t cache_misses = 0;  // requests that mapped or grew memory
  int64_t os_allocs = 0;     // backend map() calls that succeeded
  int64_t os_frees = 0;      // backend unmap() calls
  int64_t os_resizes = 0;    // backend resize() calls that succeeded (a free block grown)
  int64_t alloc_retries = 0;  // backend map() failures that made this pool return its cache and retry
  int64_t ooms = 0;           // requests the backend failed even after this pool returned its cache
};

// Flat views of Stats for C ABIs and torch ops: stat_names()[i] names flatten(stats)[i].
const std::vector<std::string>& stat_names();
std::vector<int64_t> flatten(const Stats& stats);
// Adds every statistic of `from` to `into` (peaks too: the sum of the peaks).
void accumulate(Stats& into, const Stats& from);

class Pool {
 public:
  explicit Pool(Backend& backend, Options options = {});
  ~Pool();  // returns all cached memory; blocks still allocated stay mapped
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // A 64-byte aligned block of at least `bytes` bytes; nullptr when bytes == 0 or out of memory.
  void* allocate(size_t bytes);
  // Give back a block from allocate() and return the bytes it was asked for; nullptr is ignored.
  // An unknown pointer aborts the process (a double free or a pointer from elsewhere).
  size_t free(void* ptr);
  bool owns(const void* ptr) const;

  void empty_cache();
  void set_max_cached_bytes(size_t bytes);
  size_t max_cached_bytes() const;
  // caching == false keeps nothing: freed blocks go straight back to the backend (a cap of 0,
  // without forgetting the configured cap).
  void set_caching(bool caching);
  // While held, no memory goes back to the backend: not past the cap, not for empty_cache(), not to
  // retry a failed map() (CUDA graph capture forbids cudaFree). Releasing the hold trims to the cap.
  void set_hold(bool hold);

  Stats stats() const;
  void reset_peak_stats();
  void reset_accumulated_stats();
  // (bytes allocated, bytes reserved), for profilers.
  std::pair<size_t, size_t> totals() const;

  // The size classes (bytes), smallest first.
  const std::vector<size_t>& size_classes() const { return class_sizes_; }

  // For fork handlers: hold / release the pool's lock.
  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

 private:
  struct Slab;
  struct Block {
    uintptr_t addr = 0;
    size_t size = 0;       // bytes of the block (its class size, or the pages of its range)
    size_t requested = 0;  // bytes asked for, while allocated
    Slab* slab = nullptr;  // small blocks: the slab they belong to; nullptr for large blocks
    Block* prev = nullptr;  // free list (small) or least-recently-freed list (large), while free
    Block* next = nullptr;
    bool listed = false;    // on one of those lists
    uint64_t freed_at = 0;  // large blocks: free sequence number, for best-fit ties (latest first)
    uint64_t segment = 0;   // large blocks: the map() they come from (0 where mappings merge)
    bool free = false;
  };
  struct Slab {
    uintptr_t base = 0;
    size_t bytes = 0;
    int cls = 0;
    uint32_t capacity = 0, carved = 0, used = 0;
    std::unique_ptr<Block[]> blocks;
    Slab* prev = nullptr;  // list of slabs with no block in use
    Slab* next = nullptr;
    bool listed = false;
  };
  template <class T>
  struct List {  // intrusive doubly linked list of T (prev, next, listed)
    T* head = nullptr;
    T* tail = nullptr;
    void push_back(T* x);
    void push_front(T* x);
    void remove(T* x);  // no-op when x is not listed
  };
  struct SizeClass {
    size_t size = 0;
    size_t slab_bytes = 0;
    List<Block> free;         // front: the most recently freed
    Slab* carving = nullptr;  // the one slab that still has uncarved blocks
  };
  struct BySize {
    bool operator()(const Block* a, const Block* b) const {
      if (a->size != b->size) return a->size < b->size;
      if (a->freed_at != b->freed_at) return a->freed_at > b->freed_at;
      return a->addr < b->addr;
    }
  };

  int class_of(size_t bytes) const;
  Block* allocate_small(size_t bytes);
  Block* allocate_large(size_t bytes);
  void insert_free_large(Block* b);
  void unlink_free_large(Block* b);
  void split(Block* b, size_t bytes);
  bool mergeable(const Block* a, const Block* b) const;
  bool releasable(const Block* b) const;
  void add_range(Block* b);     // into large_, counting segments
  void remove_range(Block* b);  // from large_, counting segments
  bool grow(Block* b, size_t bytes);
  void free_small(Block* b);
  void free_large(Block* b);
  void release_large(Block* b);
  void release_slab(Slab* s);
  void trim(size_t cap);  // release free blocks and empty slabs until cached bytes <= cap
  size_t cap() const { return caching_ ? options_.max_cached_bytes : 0; }
  void trim_unless_held(size_t cap) {
    if (!hold_) trim(cap);
  }
  void* map(size_t bytes);  // backend map, returning the whole cache and retrying once on failure
  void count_reserved(StatPool pool, int64_t delta);
  void count_allocated(StatPool pool, int64_t bytes, int64_t requested, bool allocate);
  void update_cached();

  Backend& backend_;
  Options options_;
  bool caching_ = true;
  bool hold_ = false;
  std::vector<size_t> class_sizes_;
  std::vector<SizeClass> classes_;
  std::map<uintptr_t, Block*> large_;    // every large block, free or not, by address
  std::set<Block*, BySize> free_large_;  // best fit
  List<Block> lru_large_;                // free large blocks, least recently freed first
  uint64_t segments_made_ = 0;
  List<Slab> empty_slabs_;               // slabs with no block in use, first emptied first
  std::unordered_map<uintptr_t, Block*> live_;
  uint64_t free_seq_ = 0;
  Stats stats_;
  mutable std::mutex mu_;
};

}  // namespace pyeff::memory
