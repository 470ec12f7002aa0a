// C loops over a step's Python lists of tensors: the per-tensor reads that an optimizer step and
// the op layer repeat at every step (devices, dtypes, shapes, layouts, gradients) cost 40-60 ns per
// tensor and per read from Python, a few ns here. They only inspect. `one_bucket` and
// `all_contiguous` have Python twins in pyeff/ops/_multi_tensor.py (for torch.compile, which cannot
// trace them, and builds without pyeff._C); `grads_signature` and `state_lists` are what let a step
// plan be reused (NOTE [step plans] in pyeff/optim/_plan.py), and without them there are no plans.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

#include "list_checks.h"
#include "tensor_prefetch.h"

namespace pyeff {
namespace {

// A borrowed reference to items[i] of a list or tuple (PySequence_Fast), or nullptr with TypeError.
struct Items {
  PyObject* seq;
  Py_ssize_t size;
  PyObject** items;
  explicit Items(PyObject* obj) : seq(PySequence_Fast(obj, "expected a list or tuple")) {
    size = seq ? PySequence_Fast_GET_SIZE(seq) : 0;
    items = seq ? PySequence_Fast_ITEMS(seq) : nullptr;
  }
  ~Items() { Py_XDECREF(seq); }
  Items(const Items&) = delete;
  Items& operator=(const Items&) = delete;
};

void append_tensor(std::vector<int64_t>& out, const at::Tensor& t) {
  out.push_back(static_cast<int64_t>(t.scalar_type()));
  out.push_back(static_cast<int64_t>(t.layout()));
  out.push_back(static_cast<int64_t>(t.device().type()));
  out.push_back(t.device().index());
  out.push_back(t.dim());
  for (int64_t s : t.sizes()) out.push_back(s);
}

// grads_signature(params) -> (grads, signature): the gradients of the parameters that have one, in
// order, and bytes that differ whenever which parameters have a gradient, or the dtype, layout,
// device or shape of a parameter with a gradient or of its gradient, differ. `p.grad` is read as
// Python reads it (a tensor subclass's own attribute included).
PyObject* grads_signature(PyObject*, PyObject* params) {
  static PyObject* grad_name = PyUnicode_InternFromString("grad");
  Items ps(params);
  if (!ps.seq) return nullptr;
  std::vector<int64_t> sig;
  sig.reserve(static_cast<size_t>(ps.size) * 12);
  PyObject* grads = PyList_New(0);
  if (!grads) return nullptr;
  prefetch_params_and_grads(ps.items, ps.size);  // NOTE [prefetching tensor objects]
  for (Py_ssize_t i = 0; i < ps.size; ++i) {
    PyObject* p = ps.items[i];
    if (!THPVariable_Check(p)) {
      Py_DECREF(grads);
      return PyErr_Format(PyExc_TypeError, "grads_signature: params[%zd] is not a tensor", i);
    }
    PyObject* g = PyObject_GetAttr(p, grad_name);  // new reference
    if (!g) {
      Py_DECREF(grads);
      return nullptr;
    }
    if (g == Py_None) {
      sig.push_back(-1);
    } else {
      if (!THPVariable_Check(g)) {  // torch's setter allows none, but a subclass may define its own `grad`
        Py_DECREF(g);
        Py_DECREF(grads);
        return PyErr_Format(PyExc_TypeError, "grads_signature: params[%zd].grad is not a tensor", i);
      }
      append_tensor(sig, THPVariable_Unpack(p));
      append_tensor(sig, THPVariable_Unpack(g));
      if (PyList_Append(grads, g) != 0) {
        Py_DECREF(g);
        Py_DECREF(grads);
        return nullptr;
      }
    }
    Py_DECREF(g);
  }
  PyObject* bytes = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(sig.data()),
                                              static_cast<Py_ssize_t>(sig.size() * sizeof(int64_t)));
  if (!bytes) {
    Py_DECREF(grads);
    return nullptr;
  }
  PyObject* out = PyTuple_Pack(2, grads, bytes);
  Py_DECREF(grads);
  Py_DECREF(bytes);
  return out;
}

// state.get(p) (borrowed; null without an error where missing). torch.Tensor.__hash__ is id(self),
// a Python call per lookup that costs more than the lookup: for exactly a torch.Tensor or
// nn.Parameter the hash is the address (hash(id(p)); checked once against a real hash), and the
// dict is searched with it.
PyObject* state_of(PyObject* state, PyObject* p) {
#if PY_VERSION_HEX < 0x030D0000
  static int id_hash = -1;  // unknown, 0: no, 1: yes
  if (THPVariable_CheckExact(p)) {
    const auto address = static_cast<Py_hash_t>(reinterpret_cast<uintptr_t>(p));
    if (id_hash < 0) {
      const Py_hash_t real = PyObject_Hash(p);
      if (real == -1) return nullptr;
      id_hash = real == address;
    }
    if (id_hash == 1) return _PyDict_GetItem_KnownHash(state, p, address);
  }
#endif
  return PyDict_GetItemWithError(state, p);
}

// state_lists(state, params, keys) -> (lists, signature): for each key, the list of
// state[p].get(key) over params (a parameter without state counts as an empty dict), and bytes that
// differ whenever, for some parameter, its state dict (by identity), that dict's length or one of
// those values (by identity) differs. `state` is read as a plain dict (a defaultdict's default is not
// made). Identity, not equality: a plan keeps no state (NOTE [step plans] in pyeff/optim/_plan.py).
PyObject* state_lists(PyObject*, PyObject* args) {
  PyObject *state, *params_obj, *keys_obj;
  if (!PyArg_ParseTuple(args, "O!OO", &PyDict_Type, &state, &params_obj, &keys_obj)) return nullptr;
  Items ps(params_obj), keys(keys_obj);
  if (!ps.seq || !keys.seq) return nullptr;
  std::vector<int64_t> sig;
  sig.reserve(static_cast<size_t>(ps.size * (2 + keys.size)));
  PyObject* lists = PyTuple_New(keys.size);
  if (!lists) return nullptr;
  auto fail = [&]() -> PyObject* {
    Py_DECREF(lists);
    return nullptr;
  };
  for (Py_ssize_t k = 0; k < keys.size; ++k) {
    PyObject* list = PyList_New(ps.size);
    if (!list) return fail();
    PyTuple_SET_ITEM(lists, k, list);  // steals the reference
  }
  // A pass per level (NOTE [prefetching tensor objects]): the parameters' state dicts, then their
  // entries, then the lists.
  std::vector<PyObject*> dicts(ps.size), values(ps.size * keys.size);
  for (Py_ssize_t i = 0; i < ps.size; ++i) {
    PyObject* d = state_of(state, ps.items[i]);  // borrowed
    if (!d && PyErr_Occurred()) return fail();
    if (d) __builtin_prefetch(d);
    dicts[i] = d;
  }
  for (Py_ssize_t i = 0; i < ps.size; ++i) {
    PyObject* d = dicts[i];
    if (d && !PyDict_Check(d)) {
      PyErr_Format(PyExc_TypeError, "state_lists: the state of params[%zd] is not a dict", i);
      return fail();
    }
    for (Py_ssize_t k = 0; k < keys.size; ++k) {
      PyObject* v = d ? PyDict_GetItemWithError(d, keys.items[k]) : nullptr;  // borrowed
      if (!v && PyErr_Occurred()) return fail();
      if (v) __builtin_prefetch(v, 1);
      values[i * keys.size + k] = v;
    }
  }
  for (Py_ssize_t i = 0; i < ps.size; ++i) {
    PyObject* d = dicts[i];
    sig.push_back(reinterpret_cast<intptr_t>(d));
    sig.push_back(d ? PyDict_GET_SIZE(d) : 0);
    for (Py_ssize_t k = 0; k < keys.size; ++k) {
      PyObject* v = values[i * keys.size + k];
      sig.push_back(reinterpret_cast<intptr_t>(v));
      v = v ? v : Py_None;
      Py_INCREF(v);
      PyList_SET_ITEM(PyTuple_GET_ITEM(lists, k), i, v);
    }
  }
  PyObject* bytes = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(sig.data()),
                                              static_cast<Py_ssize_t>(sig.size() * sizeof(int64_t)));
  if (!bytes) return fail();
  PyObject* out = PyTuple_Pack(2, lists, bytes);
  Py_DECREF(lists);
  Py_DECREF(bytes);
  return out;
}

// one_bucket(key_lists) -> bool: whether the tensors of key_lists[0] share one device and the
// tensors of each list one dtype (False for an empty first list or an item that is not a tensor).
PyObject* one_bucket(PyObject*, PyObject* key_lists) {
  Items lists(key_lists);
  if (!lists.seq) return nullptr;
  bool ok = lists.size > 0;
  for (Py_ssize_t k = 0; ok && k < lists.size; ++k) {
    Items ts(lists.items[k]);
    if (!ts.seq) return nullptr;
    ok = ts.size > 0 && THPVariable_Check(ts.items[0]);
    if (!ok) break;
    const at::Tensor& first = THPVariable_Unpack(ts.items[0]);
    for (Py_ssize_t i = 1; ok && i < ts.size; ++i) {
      ok = THPVariable_Check(ts.items[i]);
      if (!ok) break;
      const at::Tensor& t = THPVariable_Unpack(ts.items[i]);
      ok = t.scalar_type() == first.scalar_type() && (k != 0 || t.device() == first.device());
    }
  }
  return PyBool_FromLong(ok);
}

// all_contiguous(lists) -> bool: whether every item of every list is a strided, contiguous tensor.
PyObject* all_contiguous(PyObject*, PyObject* lists_obj) {
  Items lists(lists_obj);
  if (!lists.seq) return nullptr;
  bool ok = true;
  for (Py_ssize_t k = 0; ok && k < lists.size; ++k) {
    Items ts(lists.items[k]);
    if (!ts.seq) return nullptr;
    for (Py_ssize_t i = 0; ok && i < ts.size; ++i) {
      ok = THPVariable_Check(ts.items[i]);
      if (!ok) break;
      const at::Tensor& t = THPVariable_Unpack(ts.items[i]);
      ok = t.layout() == at::kStrided && t.is_contiguous();
    }
  }
  return PyBool_FromLong(ok);
}

PyMethodDef methods[] = {
    {"grads_signature", grads_signature, METH_O, "(gradients, signature bytes) of a list of parameters"},
    {"state_lists", state_lists, METH_VARARGS, "per-key lists of parameters' state values, and their signature"},
    {"one_bucket", one_bucket, METH_O, "whether parallel lists of tensors form one (device, dtypes) bucket"},
    {"all_contiguous", all_contiguous, METH_O, "whether lists of tensors hold only contiguous strided tensors"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* list_check_methods() { return methods; }

}  // namespace pyeff
