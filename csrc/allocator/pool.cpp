// The caching pool's core (NOTE [caching pool] in pool.h) and the operating-system backend.
// No torch here: the sanitizer stress test (tests/cpp/pool_stress.cpp) builds this file alone.
#include "allocator/pool.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iterator>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define PYEFF_HAVE_MMAP 1
#endif

namespace pyeff::memory {

// ---------------------------------------------------------------- the operating-system backend

namespace {

constexpr size_t kAlignment = 64;

class OsBackend final : public Backend {
 public:
  OsBackend() {
#ifdef PYEFF_HAVE_MMAP
    const long page = sysconf(_SC_PAGESIZE);
    page_ = page > 0 ? static_cast<size_t>(page) : 4096;
#endif
  }

  void* map(size_t bytes) noexcept override {
#ifdef PYEFF_HAVE_MMAP
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
#else
    return std::aligned_alloc(kAlignment, bytes);
#endif
  }

  void unmap(void* ptr, size_t bytes) noexcept override {
#ifdef PYEFF_HAVE_MMAP
    munmap(ptr, bytes);
#else
    (void)bytes;
    std::free(ptr);
#endif
  }

  void* resize(void* ptr, size_t old_bytes, size_t new_bytes) noexcept override {
#if defined(__linux__) && defined(MREMAP_MAYMOVE)
    // Moves page-table entries, never copies: resident pages stay resident.
    void* p = mremap(ptr, old_bytes, new_bytes, MREMAP_MAYMOVE);
    return p == MAP_FAILED ? nullptr : p;
#else
    (void)ptr, (void)old_bytes, (void)new_bytes;
    return nullptr;
#endif
  }

  bool partial_unmap() const noexcept override {
#ifdef PYEFF_HAVE_MMAP
    return true;
#else
    return false;
#endif
  }

  bool can_resize() const noexcept override {
#if defined(__linux__) && defined(MREMAP_MAYMOVE)
    return true;
#else
    return false;
#endif
  }

  size_t granularity() const noexcept override { return page_; }

 private:
  size_t page_ = 4096;
};

size_t round_up(size_t n, size_t multiple) { return (n + multiple - 1) / multiple * multiple; }

int floor_log2(size_t n) { return 63 - __builtin_clzll(static_cast<unsigned long long>(n)); }

}  // namespace

Backend& os_backend() {
  static OsBackend* backend = new OsBackend();  // never destroyed: blocks can be freed at exit
  return *backend;
}

// ---------------------------------------------------------------- statistics

namespace {

const char* const kKinds[] = {"allocated_bytes", "requested_bytes", "reserved_bytes",
                              "cached_bytes",    "allocation",      "segment"};
const char* const kPools[] = {"all", "small_pool", "large_pool"};
const char* const kMetrics[] = {"current", "peak", "allocated", "freed"};
constexpr int kCachedKind = 3;  // cached bytes have a current value and a peak only

template <class S>  // Stats or const Stats
auto* kind_stats(S& s, int kind) {
  decltype(&s.allocated_bytes[0]) kinds[] = {s.allocated_bytes, s.requested_bytes, s.reserved_bytes,
                                             s.cached_bytes,    s.allocation,      s.segment};
  return kinds[kind];
}

}  // namespace

const std::vector<std::string>& stat_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (int k = 0; k < 6; ++k)
      for (const char* pool : kPools)
        for (int m = 0; m < (k == kCachedKind ? 2 : 4); ++m)
          out.push_back(std::string(kKinds[k]) + "." + pool + "." + kMetrics[m]);
    for (const char* counter : {"num_cache_hits", "num_cache_misses", "num_os_allocs", "num_os_frees", "num_os_resizes",
                                "num_alloc_retries", "num_ooms"})
      out.emplace_back(counter);
    return out;
  }();
  return names;
}

std::vector<int64_t> flatten(const Stats& s) {
  std::vector<int64_t> out;
  out.reserve(stat_names().size());
  for (int k = 0; k < 6; ++k) {
    const Stat* st = kind_stats(s, k);
    for (int p = 0; p < kNumStatPools; ++p) {
      out.push_back(st[p].current);
      out.push_back(st[p].peak);
      if (k != kCachedKind) {
        out.push_back(st[p].allocated);
        out.push_back(st[p].freed);
      }
    }
  }
  for (int64_t c : {s.cache_hits, s.cache_misses, s.os_allocs, s.os_frees, s.os_resizes, s.alloc_retries, s.ooms})
    out.push_back(c);
  return out;
}

void accumulate(Stats& into, const Stats& from) {
  for (int k = 0; k < 6; ++k) {
    Stat* dst = kind_stats(into, k);
    const Stat* src = kind_stats(from, k);
    for (int p = 0; p < kNumStatPools; ++p) {
      dst[p].current += src[p].current;
      dst[p].peak += src[p].peak;
      dst[p].allocated += src[p].allocated;
      dst[p].freed += src[p].freed;
    }
  }
  into.cache_hits += from.cache_hits;
  into.cache_misses += from.cache_misses;
  into.os_allocs += from.os_allocs;
  into.os_frees += from.os_frees;
  into.os_resizes += from.os_resizes;
  into.alloc_retries += from.alloc_retries;
  into.ooms += from.ooms;
}

// ---------------------------------------------------------------- lists

template <class T>
void Pool::List<T>::push_back(T* x) {
  x->prev = tail;
  x->next = nullptr;
  (tail ? tail->next : head) = x;
  tail = x;
  x->listed = true;
}

template <class T>
void Pool::List<T>::push_front(T* x) {
  x->prev = nullptr;
  x->next = head;
  (head ? head->prev : tail) = x;
  head = x;
  x->listed = true;
}

template <class T>
void Pool::List<T>::remove(T* x) {
  if (!x->listed) return;
  (x->prev ? x->prev->next : head) = x->next;
  (x->next ? x->next->prev : tail) = x->prev;
  x->prev = x->next = nullptr;
  x->listed = false;
}

// ---------------------------------------------------------------- the pool

Pool::Pool(Backend& backend, Options options) : backend_(backend), options_(options) {
  const size_t gran = std::max(backend_.granularity(), kAlignment);
  // 64-byte steps up to 1 KiB, then four classes per power of two: at most 25 % rounding.
  for (size_t s = kAlignment; s <= 1024 && s <= options_.small_max; s += kAlignment) class_sizes_.push_back(s);
  for (size_t base = 1024; base <= options_.small_max / 2; base *= 2)
    for (size_t k = 1; k <= 4 && base + k * base / 4 <= options_.small_max; ++k)
      class_sizes_.push_back(base + k * base / 4);
  options_.small_max = class_sizes_.empty() ? 0 : class_sizes_.back();
  for (size_t s : class_sizes_) {
    SizeClass c;
    c.size = s;
    c.slab_bytes = round_up(std::max(options_.min_slab, 8 * s), gran);
    classes_.push_back(c);
  }
}

Pool::~Pool() {
  std::lock_guard<std::mutex> guard(mu_);
  trim(0);
}

int Pool::class_of(size_t bytes) const {
  if (bytes <= 1024) return static_cast<int>((bytes + kAlignment - 1) / kAlignment) - 1;
  const int e = floor_log2(bytes - 1);  // 2^e < bytes <= 2^(e+1), e >= 10
  const size_t step = size_t{1} << (e - 2);
  const size_t k = (bytes - (size_t{1} << e) + step - 1) / step;  // 1..4
  return 16 + (e - 10) * 4 + static_cast<int>(k) - 1;
}

void* Pool::map(size_t bytes) {
  void* p = backend_.map(bytes);
  if (p == nullptr) {  // out of memory: give the whole cache back and try once more
    ++stats_.alloc_retries;
    trim_unless_held(0);
    p = backend_.map(bytes);
  }
  if (p != nullptr) ++stats_.os_allocs;
  return p;
}

void* Pool::allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  std::lock_guard<std::mutex> guard(mu_);
  const bool small = bytes <= options_.small_max;
  Block* b = small ? allocate_small(bytes) : allocate_large(bytes);
  if (b == nullptr) {
    ++stats_.ooms;
    update_cached();
    return nullptr;
  }
  b->free = false;
  b->requested = bytes;
  live_.emplace(b->addr, b);
  count_allocated(small ? kSmallPool : kLargePool, static_cast<int64_t>(b->size), static_cast<int64_t>(bytes), true);
  update_cached();
  return reinterpret_cast<void*>(b->addr);
}

Pool::Block* Pool::allocate_small(size_t bytes) {
  const int cls = class_of(bytes);
  SizeClass& sc = classes_[cls];
  Block* b = sc.free.head;
  if (b != nullptr) {
    sc.free.remove(b);
    ++stats_.cache_hits;
  } else {
    Slab* s = sc.carving;
    if (s != nullptr) {
      ++stats_.cache_hits;
    } else {
      void* p = map(sc.slab_bytes);
      if (p == nullptr) return nullptr;
      ++stats_.cache_misses;
      s = new Slab;
      s->base = reinterpret_cast<uintptr_t>(p);
      s->bytes = sc.slab_bytes;
      s->cls = cls;
      s->capacity = static_cast<uint32_t>(sc.slab_bytes / sc.size);
      s->blocks.reset(new Block[s->capacity]);
      stats_.segment[kAllPools].increase(1);
      stats_.segment[kSmallPool].increase(1);
      count_reserved(kSmallPool, static_cast<int64_t>(s->bytes));
      sc.carving = s;
    }
    b = &s->blocks[s->carved];
    b->addr = s->base + s->carved * sc.size;
    b->size = sc.size;
    b->slab = s;
    if (++s->carved == s->capacity) sc.carving = nullptr;
  }
  Slab* s = b->slab;
  if (s->used++ == 0) empty_slabs_.remove(s);
  return b;
}

void Pool::insert_free_large(Block* b) {
  b->free = true;
  free_large_.insert(b);
  lru_large_.push_back(b);
}

void Pool::unlink_free_large(Block* b) {
  free_large_.erase(b);
  lru_large_.remove(b);
  b->free = false;
}

// Neighbours in memory that may become one block: on the CPU any two (mappings next to each other
// are one range to munmap and mremap), else only parts of the same segment.
bool Pool::mergeable(const Block* a, const Block* b) const {
  return a->addr + a->size == b->addr && (backend_.partial_unmap() || a->segment == b->segment);
}

// Whether a free block can go back to the backend on its own: any on the CPU; else only a whole
// segment (no mergeable neighbour on either side; free neighbours would have merged with it).
bool Pool::releasable(const Block* b) const {
  if (backend_.partial_unmap()) return true;
  auto it = large_.find(b->addr);
  if (it != large_.begin() && mergeable(std::prev(it)->second, b)) return false;
  auto next = std::next(it);
  return next == large_.end() || !mergeable(b, next->second);
}

// A segment is a run of mergeable neighbours: adding a block between two runs joins them.
void Pool::add_range(Block* b) {
  auto [it, inserted] = large_.emplace(b->addr, b);
  (void)inserted;
  int64_t joined = 0;
  if (it != large_.begin() && mergeable(std::prev(it)->second, b)) ++joined;
  auto next = std::next(it);
  if (next != large_.end() && mergeable(b, next->second)) ++joined;
  if (joined == 0) {
    stats_.segment[kAllPools].increase(1);
    stats_.segment[kLargePool].increase(1);
  } else if (joined == 2) {
    stats_.segment[kAllPools].decrease(1);
    stats_.segment[kLargePool].decrease(1);
  }
}

void Pool::remove_range(Block* b) {
  auto it = large_.find(b->addr);
  int64_t neighbours = 0;
  if (it != large_.begin() && mergeable(std::prev(it)->second, b)) ++neighbours;
  auto next = std::next(it);
  if (next != large_.end() && mergeable(b, next->second)) ++neighbours;
  large_.erase(it);
  if (neighbours == 0) {
    stats_.segment[kAllPools].decrease(1);
    stats_.segment[kLargePool].decrease(1);
  } else if (neighbours == 2) {
    stats_.segment[kAllPools].increase(1);
    stats_.segment[kLargePool].increase(1);
  }
}

// Keep the first `bytes` of free-list-unlinked block b; its tail becomes a free block when it could
// serve a large request by itself, else it stays part of b.
void Pool::split(Block* b, size_t bytes) {
  const size_t rest = b->size - bytes;
  if (rest <= options_.small_max) return;
  Block* tail = new Block;
  tail->addr = b->addr + bytes;
  tail->size = rest;
  tail->segment = b->segment;
  b->size = bytes;
  large_.emplace(tail->addr, tail);
  tail->freed_at = ++free_seq_;
  insert_free_large(tail);
}

// Grow free-list-unlinked block b to `bytes`; the backend may move it.
bool Pool::grow(Block* b, size_t bytes) {
  void* p = backend_.resize(reinterpret_cast<void*>(b->addr), b->size, bytes);
  if (p == nullptr) return false;
  ++stats_.os_resizes;
  count_reserved(kLargePool, static_cast<int64_t>(bytes - b->size));
  remove_range(b);
  b->addr = reinterpret_cast<uintptr_t>(p);
  b->size = bytes;
  add_range(b);
  return true;
}

Pool::Block* Pool::allocate_large(size_t bytes) {
  const size_t gran = std::max(backend_.granularity(), kAlignment);
  if (bytes > SIZE_MAX - gran) return nullptr;
  const size_t rounded = round_up(bytes, gran);
  Block key;
  key.size = rounded;
  key.freed_at = UINT64_MAX;  // sorts before every free block of the same size
  auto it = free_large_.lower_bound(&key);
  if (it != free_large_.end()) {
    Block* b = *it;
    unlink_free_large(b);
    split(b, rounded);
    ++stats_.cache_hits;
    return b;
  }
  if (!free_large_.empty() && backend_.can_resize()) {
    // None is large enough: grow the largest, whose resident pages are then reused.
    Block* b = *std::prev(free_large_.end());
    unlink_free_large(b);
    if (grow(b, rounded)) {
      ++stats_.cache_misses;
      return b;
    }
    insert_free_large(b);  // e.g. a block spanning two mappings, which mremap refuses
  }
  void* p = map(rounded);
  if (p == nullptr) return nullptr;
  ++stats_.cache_misses;
  Block* b = new Block;
  b->addr = reinterpret_cast<uintptr_t>(p);
  b->size = rounded;
  b->segment = backend_.partial_unmap() ? 0 : ++segments_made_;
  count_reserved(kLargePool, static_cast<int64_t>(rounded));
  add_range(b);
  return b;
}

size_t Pool::free(void* ptr) {
  if (ptr == nullptr) return 0;
  std::lock_guard<std::mutex> guard(mu_);
  auto it = live_.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == live_.end()) {
    std::fprintf(stderr, "pyeff memory pool: free of %p, which is not an allocated block (double free?)\n", ptr);
    std::abort();
  }
  Block* b = it->second;
  live_.erase(it);
  const size_t requested = b->requested;
  count_allocated(b->slab ? kSmallPool : kLargePool, static_cast<int64_t>(b->size), static_cast<int64_t>(requested),
                  false);
  b->requested = 0;
  b->free = true;
  if (b->slab != nullptr) {
    free_small(b);
  } else {
    free_large(b);
  }
  trim_unless_held(cap());
  update_cached();
  return requested;
}

void Pool::free_small(Block* b) {
  classes_[b->slab->cls].free.push_front(b);
  Slab* s = b->slab;
  if (--s->used == 0) empty_slabs_.push_back(s);
}

void Pool::free_large(Block* b) {
  auto it = large_.find(b->addr);
  if (it != large_.begin()) {
    Block* prev = std::prev(it)->second;
    if (prev->free && mergeable(prev, b)) {
      unlink_free_large(prev);
      prev->size += b->size;
      large_.erase(it);
      delete b;
      b = prev;
      it = large_.find(b->addr);
    }
  }
  auto next = std::next(it);
  if (next != large_.end() && next->second->free && mergeable(b, next->second)) {
    Block* n = next->second;
    unlink_free_large(n);
    b->size += n->size;
    large_.erase(next);
    delete n;
  }
  b->freed_at = ++free_seq_;
  insert_free_large(b);
}

void Pool::release_large(Block* b) {
  unlink_free_large(b);
  remove_range(b);
  backend_.unmap(reinterpret_cast<void*>(b->addr), b->size);
  ++stats_.os_frees;
  count_reserved(kLargePool, -static_cast<int64_t>(b->size));
  delete b;
}

void Pool::release_slab(Slab* s) {
  SizeClass& sc = classes_[s->cls];
  for (uint32_t i = 0; i < s->carved; ++i) sc.free.remove(&s->blocks[i]);
  if (sc.carving == s) sc.carving = nullptr;
  empty_slabs_.remove(s);
  backend_.unmap(reinterpret_cast<void*>(s->base), s->bytes);
  ++stats_.os_frees;
  stats_.segment[kAllPools].decrease(1);
  stats_.segment[kSmallPool].decrease(1);
  count_reserved(kSmallPool, -static_cast<int64_t>(s->bytes));
  delete s;
}

void Pool::trim(size_t cap) {
  auto cached = [&] {
    return static_cast<size_t>(stats_.reserved_bytes[kAllPools].current - stats_.allocated_bytes[kAllPools].current);
  };
  Block* candidate = lru_large_.head;
  while (cached() > cap) {
    while (candidate != nullptr && !releasable(candidate)) candidate = candidate->next;
    if (candidate != nullptr) {
      Block* next = candidate->next;
      release_large(candidate);
      candidate = next;
    } else if (empty_slabs_.head != nullptr) {
      release_slab(empty_slabs_.head);
    } else {
      break;  // what is left is free space in slabs that hold live blocks, or in segments in use
    }
  }
}

bool Pool::owns(const void* ptr) const {
  std::lock_guard<std::mutex> guard(mu_);
  return live_.count(reinterpret_cast<uintptr_t>(ptr)) != 0;
}

void Pool::empty_cache() {
  std::lock_guard<std::mutex> guard(mu_);
  trim_unless_held(0);
  update_cached();
}

void Pool::set_max_cached_bytes(size_t bytes) {
  std::lock_guard<std::mutex> guard(mu_);
  options_.max_cached_bytes = bytes;
  trim_unless_held(cap());
  update_cached();
}

size_t Pool::max_cached_bytes() const {
  std::lock_guard<std::mutex> guard(mu_);
  return options_.max_cached_bytes;
}

void Pool::set_caching(bool caching) {
  std::lock_guard<std::mutex> guard(mu_);
  caching_ = caching;
  trim_unless_held(cap());
  update_cached();
}

void Pool::set_hold(bool hold) {
  std::lock_guard<std::mutex> guard(mu_);
  hold_ = hold;
  trim_unless_held(cap());
  update_cached();
}

void Pool::count_reserved(StatPool pool, int64_t delta) {
  for (StatPool p : {kAllPools, pool}) {
    if (delta >= 0) {
      stats_.reserved_bytes[p].increase(delta);
    } else {
      stats_.reserved_bytes[p].decrease(-delta);
    }
  }
}

void Pool::count_allocated(StatPool pool, int64_t bytes, int64_t requested, bool allocate) {
  for (StatPool p : {kAllPools, pool}) {
    if (allocate) {
      stats_.allocated_bytes[p].increase(bytes);
      stats_.requested_bytes[p].increase(requested);
      stats_.allocation[p].increase(1);
    } else {
      stats_.allocated_bytes[p].decrease(bytes);
      stats_.requested_bytes[p].decrease(requested);
      stats_.allocation[p].decrease(1);
    }
  }
}

// Called at the end of every public operation that changes memory, so that the peak of cached
// bytes is never a transient (reserved before allocated is counted, or before a trim).
void Pool::update_cached() {
  for (int p = 0; p < kNumStatPools; ++p) {
    Stat& c = stats_.cached_bytes[p];
    c.current = stats_.reserved_bytes[p].current - stats_.allocated_bytes[p].current;
    c.peak = std::max(c.peak, c.current);
  }
}

Stats Pool::stats() const {
  std::lock_guard<std::mutex> guard(mu_);
  return stats_;
}

std::pair<size_t, size_t> Pool::totals() const {
  std::lock_guard<std::mutex> guard(mu_);
  return {static_cast<size_t>(stats_.allocated_bytes[kAllPools].current),
          static_cast<size_t>(stats_.reserved_bytes[kAllPools].current)};
}

void Pool::reset_peak_stats() {
  std::lock_guard<std::mutex> guard(mu_);
  for (int k = 0; k < 6; ++k) {
    Stat* st = kind_stats(stats_, k);
    for (int p = 0; p < kNumStatPools; ++p) st[p].peak = st[p].current;
  }
}

void Pool::reset_accumulated_stats() {
  std::lock_guard<std::mutex> guard(mu_);
  for (int k = 0; k < 6; ++k) {
    Stat* st = kind_stats(stats_, k);
    for (int p = 0; p < kNumStatPools; ++p) st[p].allocated = st[p].freed = 0;
  }
  stats_.cache_hits = stats_.cache_misses = stats_.os_allocs = stats_.os_frees = stats_.os_resizes = 0;
  stats_.alloc_retries = stats_.ooms = 0;
}

}  // namespace pyeff::memory
