#pragma once
// NOTE [prefetching tensor objects]
// An optimizer step starts with cold caches: the forward and backward passes (or, in the
// benchmarks, the previous contender's pass over memory) have evicted the objects its host work
// reads. For every tensor of its lists that work follows a chain of pointers, the Python object,
// its TensorImpl, the storage, the version counter (whose increment is atomic, so it cannot overlap
// the next tensor's), the data: each link a cache miss that waits for the one before, about 1 us
// per tensor, a third of a 200-tensor step's host time. Walking a list level by level and
// prefetching each level's objects for all its tensors before reading any of them turns those
// waits into one per level. Prefetches never fault, so these only read through pointers of live
// objects: the list holds its items, each item its TensorImpl, each TensorImpl its storage and
// version counter.
#include <ATen/core/Tensor.h>
#include <Python.h>
#include <c10/core/TensorImpl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

namespace pyeff {

inline void prefetch_lines(const void* p, size_t bytes) {
  for (size_t at = 0; at < bytes; at += 64) __builtin_prefetch(static_cast<const char*>(p) + at);
}

// The tensor of `obj` when it is exactly a torch.Tensor or nn.Parameter (a subclass may behave
// otherwise), else null.
inline const at::Tensor* exact_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) ? &THPVariable_Unpack(obj) : nullptr;
}

inline c10::TensorImpl* exact_impl(PyObject* obj) {
  const at::Tensor* t = exact_tensor(obj);
  return t ? t->unsafeGetTensorImpl() : nullptr;
}

// What a tensor's host work reads besides its TensorImpl: the storage, the version counter (the
// one member of c10::VariableVersion: its intrusive_ptr's pointer), the first line of the data.
inline void prefetch_behind(const c10::TensorImpl* impl) {
  if (impl->has_storage()) {
    const c10::StorageImpl* storage = impl->storage().unsafeGetStorageImpl();
    prefetch_lines(storage, sizeof(c10::StorageImpl));
  }
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*));
  __builtin_prefetch(*reinterpret_cast<void* const*>(&impl->version_counter()), 1);
}

inline void prefetch_data(const c10::TensorImpl* impl) {  // host memory only: the host reads no device data
  if (impl->has_storage() && impl->device_type() == c10::DeviceType::CPU) {
    __builtin_prefetch(impl->storage().unsafeGetStorageImpl()->data_ptr().get());
  }
}

// items[0, n): the tensors' Python objects, TensorImpls, storages, version counters and first data
// lines, a level at a time (items that are not exactly tensors are skipped).
inline void prefetch_tensors(PyObject* const* items, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n; ++i) __builtin_prefetch(items[i]);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (const c10::TensorImpl* impl = exact_impl(items[i])) prefetch_lines(impl, sizeof(c10::TensorImpl));
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (const c10::TensorImpl* impl = exact_impl(items[i])) prefetch_behind(impl);
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (const c10::TensorImpl* impl = exact_impl(items[i])) prefetch_data(impl);
  }
}

// params[0, n): the parameters as prefetch_tensors reads them, and their gradients' TensorImpls
// (through the autograd metadata), for the reads of `p.grad`.
inline void prefetch_params_and_grads(PyObject* const* params, Py_ssize_t n) {
  prefetch_tensors(params, n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (const c10::TensorImpl* impl = exact_impl(params[i])) __builtin_prefetch(impl->autograd_meta());
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    const c10::TensorImpl* impl = exact_impl(params[i]);
    if (impl == nullptr || impl->autograd_meta() == nullptr) continue;
    const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta());
    if (meta->grad_.defined()) prefetch_lines(meta->grad_.unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
  }
}

}  // namespace pyeff
