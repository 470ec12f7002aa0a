#pragma once
// NOTE [CUDA emulation] (csrc/cuda/runtime.cuh): the names that csrc/cuda/*.cu take from CUDA, over
// CPU threads, so that tests/test_cuda_emulation.py can run those kernels here, on CPU tensors.
// A launch runs its blocks one after another, each as blockDim real threads (so __syncthreads is a
// real barrier and __shared__ a static shared by the block's threads); kernel parameters are copied
// as CUDA copies them. Not emulated: warps, the memory model beyond sequential consistency, timing.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

namespace pyeff::cuda::emu {

struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

inline thread_local Dim3 thread_idx, block_idx;
inline Dim3 block_dim, grid_dim;

// A reusable barrier for the threads of one block.
class Barrier {
 public:
  void reset(int n) { count_ = n, waiting_ = 0, generation_ = 0; }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int gen = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_ = 0, waiting_ = 0, generation_ = 0;
};

inline Barrier block_barrier;
inline std::atomic<bool> assert_failed{false};
inline std::string assert_text;

inline void device_assert(bool ok, const char* text) {
  if (!ok && !assert_failed.exchange(true)) assert_text = text;
}

}  // namespace pyeff::cuda::emu

#define threadIdx (::pyeff::cuda::emu::thread_idx)
#define blockIdx (::pyeff::cuda::emu::block_idx)
#define blockDim (::pyeff::cuda::emu::block_dim)
#define gridDim (::pyeff::cuda::emu::grid_dim)

inline void __syncthreads() { ::pyeff::cuda::emu::block_barrier.wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

namespace pyeff::cuda {

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

// A few resident blocks, so that the grid strides over many chunks (PYEFF_EMULATED_BLOCKS).
inline int blocks_per_device() {
  const char* env = std::getenv("PYEFF_EMULATED_BLOCKS");
  return env ? std::atoi(env) : 3;
}

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), int grid, int block, Args&&... args) {
  if (grid == 0) return;
  emu::grid_dim = {static_cast<unsigned int>(grid), 1, 1};
  emu::block_dim = {static_cast<unsigned int>(block), 1, 1};
  emu::assert_failed = false;
  for (int b = 0; b < grid; ++b) {
    emu::block_barrier.reset(block);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (int t = 0; t < block; ++t) {
      // Each thread gets its own copy of the kernel's parameters, as on a GPU.
      threads.emplace_back([=]() mutable {
        emu::thread_idx = {static_cast<unsigned int>(t), 1, 1};
        emu::block_idx = {static_cast<unsigned int>(b), 1, 1};
        kernel(args...);
      });
    }
    for (auto& th : threads) th.join();
  }
  TORCH_CHECK(!emu::assert_failed, "device-side assert triggered (emulated): ", emu::assert_text);
}

// One zeroed scratch buffer (the emulation has one stream).
inline void* scratch(size_t bytes) {
  static at::Tensor buffer;
  if (!buffer.defined() || static_cast<size_t>(buffer.numel()) < bytes) {
    buffer = at::zeros({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  }
  return buffer.data_ptr();
}

}  // namespace pyeff::cuda

#define PYEFF_DEVICE_ASSERT(cond) ::pyeff::cuda::emu::device_assert((cond), #cond)
#define PYEFF_REGISTER_CUDA(op, fn) \
  TORCH_LIBRARY_FRAGMENT(pyeff_emulated, m) { m.def(op, fn); }
#define PYEFF_REGISTER_SPARSE_CUDA(op, fn)
