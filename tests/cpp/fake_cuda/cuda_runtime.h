#pragma once
// A stand-in for the few CUDA runtime calls csrc/allocator/cuda_pool.cu makes, over host memory,
// so that its C ABI runs (under AddressSanitizer) on machines without a GPU:
// tests/cpp/cuda_pool_abi.cpp. fake_cuda_limit caps the "device" memory to provoke failures.
#include <cstddef>
#include <cstdlib>
#include <map>
#include <mutex>

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorMemoryAllocation = 2;
constexpr cudaError_t cudaErrorInvalidValue = 1;
typedef struct CUstream_st* cudaStream_t;

struct FakeCuda {
  std::mutex mu;
  std::map<void*, size_t> live;
  size_t in_use = 0;
  size_t limit = SIZE_MAX;
  int device = 0;
  cudaError_t last = cudaSuccess;
  int mallocs = 0, frees = 0, bad_frees = 0;
};

inline FakeCuda& fake_cuda() {
  static FakeCuda* f = new FakeCuda();
  return *f;
}

inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  FakeCuda& f = fake_cuda();
  std::lock_guard<std::mutex> g(f.mu);
  if (f.in_use + bytes > f.limit) return f.last = cudaErrorMemoryAllocation;
  *p = std::aligned_alloc(256, bytes);
  f.live[*p] = bytes;
  f.in_use += bytes;
  ++f.mallocs;
  return cudaSuccess;
}

inline cudaError_t cudaFree(void* p) {
  FakeCuda& f = fake_cuda();
  std::lock_guard<std::mutex> g(f.mu);
  auto it = f.live.find(p);
  if (it == f.live.end()) {
    ++f.bad_frees;  // cudaFree of something cudaMalloc did not return: the pool must never do this
    return f.last = cudaErrorInvalidValue;
  }
  f.in_use -= it->second;
  f.live.erase(it);
  std::free(p);
  ++f.frees;
  return cudaSuccess;
}

inline cudaError_t cudaGetDevice(int* d) {
  *d = fake_cuda().device;
  return cudaSuccess;
}

inline cudaError_t cudaSetDevice(int d) {
  fake_cuda().device = d;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  cudaError_t e = fake_cuda().last;
  fake_cuda().last = cudaSuccess;
  return e;
}
