#pragma once
// The fast Python entry to pyeff's in-place ops (NOTE [calling an op from Python] in
// csrc/op_call.cpp): the Python arguments converted to an op's C++ signature, the tensors borrowed
// from their Python objects, and one typed call through the dispatcher.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <Python.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/MaybeOwned.h>

#include <functional>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace pyeff {

PyMethodDef* op_call_methods();

namespace op_call {

// A tensor of the Python object `obj`, exactly a torch.Tensor or nn.Parameter, borrowed: no
// reference count changes (they take the GIL in torch's PyObject bookkeeping); the caller keeps
// the object alive. Null where `obj` is anything else.
const at::Tensor* exact_tensor(PyObject* obj);

// NOTE [prefetching tensor objects] (csrc/tensor_prefetch.h) over items[0, n).
void prefetch(PyObject* const* items, Py_ssize_t n);

using Borrow = c10::MaybeOwnedTraits<at::Tensor>;

// One argument of C++ type T from a Python object: load() is false where the generic path must run.
template <typename T>
struct Arg;

template <>
struct Arg<at::TensorList> {
  PyObject* items = nullptr;  // a tuple holding the list's objects while the op runs
  std::vector<at::Tensor> tensors;
  bool load(PyObject* obj) {
    if (!PyList_CheckExact(obj) && !PyTuple_CheckExact(obj)) return false;
    items = PySequence_Tuple(obj);
    if (!items) return (PyErr_Clear(), false);
    const Py_ssize_t n = PyTuple_GET_SIZE(items);
    prefetch(&PyTuple_GET_ITEM(items, 0), n);
    tensors.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor* t = exact_tensor(PyTuple_GET_ITEM(items, i));
      if (!t) return false;
      tensors.push_back(Borrow::createBorrow(*t));
    }
    return true;
  }
  at::TensorList get() const { return tensors; }
  ~Arg() {
    for (auto& t : tensors) Borrow::destroyBorrow(t);
    Py_XDECREF(items);
  }
};

template <>
struct Arg<const std::optional<at::Tensor>&> {
  std::optional<at::Tensor> value;
  bool load(PyObject* obj) {
    if (obj == Py_None) return true;
    const at::Tensor* t = exact_tensor(obj);  // the caller's argument tuple holds obj
    if (!t) return false;
    value = Borrow::createBorrow(*t);
    return true;
  }
  const std::optional<at::Tensor>& get() const { return value; }
  ~Arg() {
    if (value) Borrow::destroyBorrow(*value);
  }
};

template <>
struct Arg<const at::Tensor&> {
  at::Tensor value;
  bool load(PyObject* obj) {
    const at::Tensor* t = exact_tensor(obj);  // the caller's argument tuple holds obj
    if (!t) return false;
    value = Borrow::createBorrow(*t);
    return true;
  }
  const at::Tensor& get() const { return value; }
  ~Arg() {
    if (value.defined()) Borrow::destroyBorrow(value);
  }
};

// Each item of a list or tuple through `take` (false: the generic path must run).
template <typename F>
bool each_item(PyObject* obj, F take) {
  if (!PyList_CheckExact(obj) && !PyTuple_CheckExact(obj)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!take(PySequence_Fast_ITEMS(obj)[i])) return false;
  }
  return true;
}

inline bool load_int(PyObject* obj, int64_t& out) {
  if (!PyLong_CheckExact(obj)) return false;
  out = PyLong_AsLongLong(obj);
  return !PyErr_Occurred() || (PyErr_Clear(), false);
}

template <>
struct Arg<at::IntArrayRef> {
  std::vector<int64_t> values;
  bool load(PyObject* obj) {
    return each_item(obj, [&](PyObject* item) { return load_int(item, values.emplace_back()); });
  }
  at::IntArrayRef get() const { return values; }
};

template <>
struct Arg<const c10::List<bool>&> {
  c10::List<bool> values;
  bool load(PyObject* obj) {
    return each_item(obj, [&](PyObject* item) {
      if (!PyBool_Check(item)) return false;
      values.push_back(item == Py_True);
      return true;
    });
  }
  const c10::List<bool>& get() const { return values; }
};

template <>
struct Arg<double> {
  double value = 0;
  bool load(PyObject* obj) {
    if (PyFloat_CheckExact(obj)) {
      value = PyFloat_AS_DOUBLE(obj);
      return true;
    }
    if (!PyLong_CheckExact(obj)) return false;  // torch takes an int for a float argument
    value = PyLong_AsDouble(obj);
    return !PyErr_Occurred() || (PyErr_Clear(), false);
  }
  double get() const { return value; }
};

template <>
struct Arg<int64_t> {
  int64_t value = 0;
  bool load(PyObject* obj) { return load_int(obj, value); }
  int64_t get() const { return value; }
};

template <>
struct Arg<bool> {
  bool value = false;
  bool load(PyObject* obj) {
    if (!PyBool_Check(obj)) return false;
    value = obj == Py_True;
    return true;
  }
  bool get() const { return value; }
};

// Runs `op` on the positional arguments `values` (a tuple): true when it ran, false (no Python
// error set) where the generic path must run instead. C++ errors propagate. With null `values`,
// only checks that the op's kernels have the caller's signature (a c10::Error where not).
using Caller = bool (*)(const c10::OperatorHandle& op, PyObject* values);

void run_without_gil(const std::function<void()>& f);

template <typename Sig>
struct Typed;

template <typename... Args>
struct Typed<void(Args...)> {
  template <size_t... I>
  static bool run(const c10::OperatorHandle& op, PyObject* values, std::index_sequence<I...>) {
    if (at::GradMode::is_enabled() || PyTuple_GET_SIZE(values) != static_cast<Py_ssize_t>(sizeof...(Args))) {
      return false;
    }
    std::tuple<Arg<Args>...> args;
    if (!(std::get<I>(args).load(PyTuple_GET_ITEM(values, I)) && ...)) return false;
    const auto typed = op.typed<void(Args...)>();
    run_without_gil([&] {
      // Below torch's autograd fallback, which with grad mode off only passes the call on.
      c10::impl::ExcludeDispatchKeyGuard below_autograd(c10::autograd_dispatch_keyset);
      typed.call(std::get<I>(args).get()...);
    });
    return true;
  }
  static bool call(const c10::OperatorHandle& op, PyObject* values) {
    if (values == nullptr) return (op.typed<void(Args...)>(), true);
    return run(op, values, std::index_sequence_for<Args...>{});
  }
};

// Makes call_op take `name`'s overloads through Typed<Sig> (Sig: the op's kernel signature).
bool add(const char* name, Caller caller);

}  // namespace op_call
}  // namespace pyeff

// In an op's .cpp, beside its registration: PYEFF_OP_CALL(adagrad_step, adagrad_step_cpu).
#define PYEFF_OP_CALL(name, kernel)                                                                         \
  [[maybe_unused]] static const bool pyeff_op_call_##name =                                                \
      ::pyeff::op_call::add(#name, &::pyeff::op_call::Typed<std::remove_pointer_t<decltype(&kernel)>>::call)
