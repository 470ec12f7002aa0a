// NOTE [calling an op from Python]
// torch.ops.pyeff.<op>.<backend>(*args) converts every argument to an IValue by the op's schema, and
// for a list of tensors it does so element by element through the generic converter, which asks
// each element whether it is a SymInt, a SymBool or has __torch_function__ (locks and a
// pthread_once per element): about 0.2 us per tensor and per list, 0.4 us per parameter for an
// optimizer op with four lists. Then the boxed call copies each list into a vector of tensors, and
// each copy of a tensor that has a Python object changes its reference count through torch's
// PyObject bookkeeping, which takes the GIL (a mutex) per tensor. `call_op` converts the Python
// arguments to the op's C++ signature itself (csrc/op_call.h), borrowing each tensor from its Python
// object, and makes one typed call of the same operator through the dispatcher (dispatch keys,
// TorchDispatchModes, the Meta key as before). It runs with grad mode off only (an optimizer step
// always), where torch's autograd fallback, a boxed kernel at the Autograd keys that would box
// every argument, only passes the call on: so the call starts below it. It gives up, returning
// NotImplemented, wherever the generic path could do something else: grad mode on, an element that
// is not exactly a torch.Tensor or nn.Parameter (a subclass may have __torch_function__ or
// __torch_dispatch__), an active TorchFunctionMode, a value of another type (a SymInt, a NumPy
// scalar). pyeff/ops/_registry.py then calls the overload as before, and always does under
// torch.compile, which traces that call. The GIL is released while the op runs, as torch's own
// binding does; the argument lists are copied into tuples first, so that no tensor borrowed from
// them can be freed by another thread meanwhile.
#include <ATen/PythonTorchFunctionTLS.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <functional>
#include <string>
#include <unordered_map>

#include "op_call.h"
#include "tensor_prefetch.h"

namespace pyeff {
namespace op_call {

const at::Tensor* exact_tensor(PyObject* obj) { return pyeff::exact_tensor(obj); }

void prefetch(PyObject* const* items, Py_ssize_t n) { prefetch_tensors(items, n); }

void run_without_gil(const std::function<void()>& f) {
  pybind11::gil_scoped_release no_gil;
  f();
}

namespace {
std::unordered_map<std::string, Caller>& callers() {
  static std::unordered_map<std::string, Caller> table;
  return table;
}
}  // namespace

bool add(const char* name, Caller caller) {
  callers()[name] = caller;
  return true;
}

}  // namespace op_call

namespace {

constexpr const char* kCapsule = "pyeff.op_handle";

struct Handle {
  c10::OperatorHandle op;
  op_call::Caller caller;
};

void free_handle(PyObject* capsule) { delete static_cast<Handle*>(PyCapsule_GetPointer(capsule, kCapsule)); }

// op_handle(name, overload) -> an opaque handle of the operator pyeff::<name>.<overload> for
// call_op, or None for an op without a fast entry (PYEFF_OP_CALL) or whose kernels have another
// signature than the entry's.
PyObject* op_handle(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* name = nullptr;
  const char* overload = nullptr;
  if (!PyArg_ParseTuple(args, "ss", &name, &overload)) return nullptr;
  const auto found = op_call::callers().find(name);
  if (found == op_call::callers().end()) Py_RETURN_NONE;
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow((std::string("pyeff::") + name).c_str(), overload);
  try {
    found->second(op, nullptr);
  } catch (const c10::Error&) {  // a kernel of another signature: the generic path
    Py_RETURN_NONE;
  }
  return PyCapsule_New(new Handle{op, found->second}, kCapsule, free_handle);
  END_HANDLE_TH_ERRORS
}

// call_op(handle, args) -> None after running the operator on the positional `args` (a tuple, in
// the schema's order), or NotImplemented where the caller must use the generic path (see the note).
PyObject* call_op(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* capsule = nullptr;
  PyObject* values = nullptr;
  if (!PyArg_ParseTuple(args, "OO!", &capsule, &PyTuple_Type, &values)) return nullptr;
  auto* handle = static_cast<Handle*>(PyCapsule_GetPointer(capsule, kCapsule));
  if (!handle) return nullptr;
  if (at::impl::torch_function_mode_enabled() || !handle->caller(handle->op, values)) Py_RETURN_NOTIMPLEMENTED;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"op_handle", op_handle, METH_VARARGS, "a handle of an in-place pyeff operator (name, overload) for call_op"},
    {"call_op", call_op, METH_VARARGS, "run an operator on a tuple of positional arguments, or NotImplemented"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* op_call_methods() { return methods; }

}  // namespace pyeff
