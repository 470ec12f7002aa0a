// The caching pool (NOTE [caching pool] in pool.h) as torch's CPU allocator, and the ops that switch
// it on and off and read its statistics (pyeff/memory/__init__.py is their public face).
//
// NOTE [switching the CPU allocator]
// c10::SetCPUAllocator swaps the allocator that every new CPU storage asks for memory. Each DataPtr
// carries its own deleter, so a tensor allocated before enable() goes back to the allocator that
// made it, and one from the pool goes back to the pool whenever it dies, after disable() too; the
// allocator object and its pool therefore live until the process ends. disable() puts back the
// allocator that was installed at enable() and turns caching off: the cache is returned to the
// operating system, and so is every pool block still alive, when it is freed. The swap itself is
// one pointer store; storages that already exist keep the allocator they were made with (it is
// asked again only when they are resized).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "allocator/pool.h"

namespace pyeff::memory {
namespace {

Pool& cpu_pool() {
  // Never destroyed: pool blocks may be freed during static destruction, after disable(), at exit.
  static Pool* pool = [] {
    auto* p = new Pool(os_backend());
    p->set_caching(false);  // until enable()
#if defined(__unix__) || defined(__APPLE__)
    // A fork while another thread holds the pool's lock would leave the child's copy locked forever.
    pthread_atfork([] { cpu_pool().lock(); }, [] { cpu_pool().unlock(); }, [] { cpu_pool().unlock(); });
#endif
    return p;
  }();
  return *pool;
}

void report_to_profiler(void* ptr, int64_t delta) {
  if (c10::memoryProfilingEnabled()) {
    const auto [allocated, reserved] = cpu_pool().totals();
    c10::reportMemoryUsageToProfiler(ptr, delta, allocated, reserved, c10::Device(c10::DeviceType::CPU));
  }
}

void free_block(void* ptr) {
  const size_t bytes = cpu_pool().free(ptr);
  report_to_profiler(ptr, -static_cast<int64_t>(bytes));
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* ptr = cpu_pool().allocate(bytes);
    TORCH_CHECK_WITH(OutOfMemoryError, ptr != nullptr || bytes == 0, "pyeff memory pool: out of memory: tried to ",
                     "allocate ", bytes, " bytes (", cpu_pool().totals().second, " bytes reserved); see ",
                     "pyeff.memory.memory_summary()");
    if (ptr != nullptr) report_to_profiler(ptr, static_cast<int64_t>(bytes));
    // The context is the pointer itself, as in torch's own allocators: raw_allocate() needs that.
    return {ptr, ptr, &free_block, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

CachingCPUAllocator& caching_allocator() {
  static auto* allocator = new CachingCPUAllocator();
  return *allocator;
}

std::mutex switch_mu;
c10::Allocator* previous = nullptr;  // installed before enable(); non-null while enabled

bool enable() {
  std::lock_guard<std::mutex> guard(switch_mu);
  if (previous != nullptr) return false;
  c10::Allocator* current = c10::GetCPUAllocator();
  cpu_pool().set_caching(true);
  c10::SetCPUAllocator(&caching_allocator(), /*priority=*/0);
  if (c10::GetCPUAllocator() != &caching_allocator()) {
    cpu_pool().set_caching(false);
    TORCH_CHECK(false, "pyeff.memory.enable(): torch kept its CPU allocator, which was installed with a higher ",
                "priority than pyeff's (0); the pool cannot replace it");
  }
  previous = current;
  return true;
}

bool disable() {
  std::lock_guard<std::mutex> guard(switch_mu);
  if (previous == nullptr) return false;
  // Someone else may have installed an allocator over ours since: leave theirs in place.
  if (c10::GetCPUAllocator() == &caching_allocator()) c10::SetCPUAllocator(previous, /*priority=*/0);
  previous = nullptr;
  cpu_pool().set_caching(false);
  return true;
}

bool is_enabled() {
  std::lock_guard<std::mutex> guard(switch_mu);
  return previous != nullptr && c10::GetCPUAllocator() == &caching_allocator();
}

std::vector<int64_t> stats() { return flatten(cpu_pool().stats()); }

std::vector<std::string> stat_names_op() { return stat_names(); }

void set_max_cached_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= -1, "memory_set_max_cached_bytes: expected bytes >= 0 (or -1 for no cap), got ", bytes);
  cpu_pool().set_max_cached_bytes(bytes < 0 ? SIZE_MAX : static_cast<size_t>(bytes));
}

int64_t max_cached_bytes() {
  const size_t cap = cpu_pool().max_cached_bytes();
  return cap == SIZE_MAX ? -1 : static_cast<int64_t>(cap);
}

bool owns(const at::Tensor& t) {
  return t.has_storage() && t.storage().data_ptr().get_deleter() == &free_block &&
         cpu_pool().owns(t.storage().data_ptr().get());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  m.def("memory_enable() -> bool", &enable);
  m.def("memory_disable() -> bool", &disable);
  m.def("memory_is_enabled() -> bool", &is_enabled);
  m.def("memory_stats() -> int[]", &stats);
  m.def("memory_stat_names() -> str[]", &stat_names_op);
  m.def("memory_reset_peak_stats() -> ()", [] { cpu_pool().reset_peak_stats(); });
  m.def("memory_reset_accumulated_stats() -> ()", [] { cpu_pool().reset_accumulated_stats(); });
  m.def("memory_empty_cache() -> ()", [] { cpu_pool().empty_cache(); });
  m.def("memory_set_max_cached_bytes(int bytes) -> ()", &set_max_cached_bytes);
  m.def("memory_max_cached_bytes() -> int", &max_cached_bytes);
  m.def("memory_size_classes() -> int[]", [] {
    const auto& sizes = cpu_pool().size_classes();
    return std::vector<int64_t>(sizes.begin(), sizes.end());
  });
  m.def("memory_owns(Tensor t) -> bool", &owns);
}

}  // namespace pyeff::memory
