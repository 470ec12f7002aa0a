#pragma once
// A stand-in for the CUDA runtime calls csrc/allocator/cuda_pool.cu makes, over host memory, so that
// the pool's rules run (under AddressSanitizer) on machines without a GPU: tests/cpp/cuda_pool_test.cpp.
// The test drives the "device": `limit` caps its memory, `finish(stream)` completes the work queued
// on a stream so far (events recorded there), and `capturing` marks a graph capture underway in
// cudaStreamCaptureModeGlobal (as torch.cuda.graph captures), during which every call that is illegal
// then (cudaFree, recording, querying or waiting on events, syncs; cudaMalloc unless the calling
// thread exchanged its mode for relaxed, which CUDA then refuses) is counted in `illegal_in_capture`.
// `malloc_error` makes cudaMalloc fail with that error (not out of memory).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorMemoryAllocation = 2;
constexpr cudaError_t cudaErrorNotReady = 600;
constexpr cudaError_t cudaErrorStreamCaptureUnsupported = 900;
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2
};
constexpr unsigned int cudaEventDisableTiming = 2;
typedef struct CUstream_st* cudaStream_t;

struct FakeEvent {
  cudaStream_t stream = nullptr;
  int device = 0;
  bool recorded = false;
  bool complete = false;
};
typedef FakeEvent* cudaEvent_t;

struct FakeCuda {
  std::mutex mu;
  std::map<void*, size_t> live;
  std::set<FakeEvent*> events;
  size_t in_use = 0;
  size_t limit = SIZE_MAX;
  size_t total = size_t{8} << 30;  // what cudaMemGetInfo reports
  int device = 0;
  bool capturing = false;
  cudaError_t last = cudaSuccess;
  cudaError_t malloc_error = cudaSuccess;
  int mallocs = 0, frees = 0, bad_frees = 0, event_syncs = 0, stream_syncs = 0, illegal_in_capture = 0;

  void illegal_if_capturing() {
    if (capturing) ++illegal_in_capture;
  }
  // The stream's work so far is done: its recorded events complete.
  void finish(cudaStream_t stream) {
    std::lock_guard<std::mutex> g(mu);
    for (FakeEvent* e : events)
      if (e->recorded && e->stream == stream) e->complete = true;
  }
  int recorded_on(cudaStream_t stream) {
    std::lock_guard<std::mutex> g(mu);
    int n = 0;
    for (FakeEvent* e : events) n += e->recorded && !e->complete && e->stream == stream;
    return n;
  }
};

inline FakeCuda& fake_cuda() {
  static FakeCuda* f = new FakeCuda();
  return *f;
}

// The calling thread's capture mode (cudaThreadExchangeStreamCaptureMode); CUDA's default is global.
inline cudaStreamCaptureMode& fake_thread_capture_mode() {
  static thread_local cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  return mode;
}

inline cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) {
  const cudaStreamCaptureMode previous = fake_thread_capture_mode();
  fake_thread_capture_mode() = *mode;
  *mode = previous;
  return cudaSuccess;
}

inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  FakeCuda& f = fake_cuda();
  std::lock_guard<std::mutex> g(f.mu);
  if (f.capturing && fake_thread_capture_mode() != cudaStreamCaptureModeRelaxed) {
    ++f.illegal_in_capture;  // a potentially unsafe call: refused, and the capture is invalidated
    return f.last = cudaErrorStreamCaptureUnsupported;
  }
  if (f.malloc_error != cudaSuccess) return f.last = f.malloc_error;
  if (f.in_use + bytes > f.limit || f.in_use + bytes > f.total) return f.last = cudaErrorMemoryAllocation;
  *p = std::aligned_alloc(256, bytes);
  f.live[*p] = bytes;
  f.in_use += bytes;
  ++f.mallocs;
  return cudaSuccess;
}

inline cudaError_t cudaFree(void* p) {
  FakeCuda& f = fake_cuda();
  std::lock_guard<std::mutex> g(f.mu);
  f.illegal_if_capturing();
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

inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) {
  FakeCuda& f = fake_cuda();
  std::lock_guard<std::mutex> g(f.mu);
  *total = f.total;
  *free_bytes = f.total - f.in_use;
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

inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int /*flags*/) {
  FakeCuda& f = fake_cuda();
  std::lock_guard<std::mutex> g(f.mu);
  *e = new FakeEvent();
  (*e)->device = f.device;
  f.events.insert(*e);
  return cudaSuccess;
}

inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t stream) {
  FakeCuda& f = fake_cuda();
  std::lock_guard<std::mutex> g(f.mu);
  f.illegal_if_capturing();
  if (f.events.count(e) == 0 || e->device != f.device) return f.last = cudaErrorInvalidValue;
  e->stream = stream;
  e->recorded = true;
  e->complete = false;
  return cudaSuccess;
}

inline cudaError_t cudaEventQuery(cudaEvent_t e) {
  FakeCuda& f = fake_cuda();
  std::lock_guard<std::mutex> g(f.mu);
  f.illegal_if_capturing();
  if (!e->recorded || e->complete) return cudaSuccess;
  return f.last = cudaErrorNotReady;
}

inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  FakeCuda& f = fake_cuda();
  std::lock_guard<std::mutex> g(f.mu);
  f.illegal_if_capturing();
  e->complete = true;
  ++f.event_syncs;
  return cudaSuccess;
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  FakeCuda& f = fake_cuda();
  {
    std::lock_guard<std::mutex> g(f.mu);
    f.illegal_if_capturing();
    ++f.stream_syncs;
  }
  f.finish(stream);
  return cudaSuccess;
}
