#pragma once
// The CUDA runtime as pyeff's kernels use it: the device kind their tensors live on, a device guard,
// the device's size, kernel launches, a scratch buffer, device asserts, and the registration of an
// op's `cuda` overload.
//
// NOTE [CUDA emulation]
// Most sessions that work on pyeff have no GPU. So that the CUDA kernels are still run and tested
// against their references, this header is the only place with CUDA runtime calls: built with
// PYEFF_CUDA_EMULATION (tests/test_cuda_emulation.py), tests/cpp/cuda_emulation.h provides the
// same names over CPU threads, the kernels run on CPU tensors, and each op registers as
// torch.ops.pyeff_emulated.<op> instead of the CUDA overload. Only the launch and the memory model
// are not what a GPU does; indexing, chunking, the argument tables, alignment paths and the math are.
#ifdef PYEFF_CUDA_EMULATION
#include "cuda_emulation.h"
#else
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>

namespace pyeff::cuda {

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
using DeviceGuard = c10::cuda::CUDAGuard;

// Resident blocks per device: enough to fill every SM (kernels use 512 threads, so up to 4 blocks
// of them fit an SM's 2048 threads).
inline int blocks_per_device() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return 4 * sms;
}

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), int grid, int block, Args&&... args) {
  if (grid == 0) return;
  kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A zeroed scratch buffer of at least `bytes` per (device, stream), kept for the process: made by
// the first call on a stream, reused by every later one, so a step allocates nothing and can be
// captured in a CUDA graph. Calls on one stream are ordered, so they may share it.
inline void* scratch(size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> buffers;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& t = buffers[{stream.device_index(), stream.stream()}];
  if (!t.defined() || static_cast<size_t>(t.numel()) < bytes) {
    t = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(stream.device()));
    C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0, bytes, stream.stream()));
  }
  return t.data_ptr();
}

}  // namespace pyeff::cuda

#define PYEFF_DEVICE_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#define PYEFF_REGISTER_CUDA(op, fn) \
  TORCH_LIBRARY_IMPL(pyeff, CUDA, m) { m.impl(op ".cuda", fn); }
#define PYEFF_REGISTER_SPARSE_CUDA(op, fn) \
  TORCH_LIBRARY_IMPL(pyeff, SparseCUDA, m) { m.impl(op ".cuda", fn); }
#endif

