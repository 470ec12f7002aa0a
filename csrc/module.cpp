// The Python module pyeff._C (importing it registers every op below csrc/ with torch.library) and
// the small ops that describe the build: which CPU kernels run, the bandwidth ceiling loop.
#include <ATen/core/Tensor.h>
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/stream_kernel.h"
#include "list_checks.h"
#include "op_call.h"

namespace pyeff {
namespace {

std::string cpu_isa() { return cpu::isa_name(cpu::best_isa()); }

// Always raises, with numbers in its message: pyeff/_cxx_runtime.py checks that the text reaches
// Python whole, which a second copy of libstdc++ in the process breaks (NOTE [one C++ runtime]).
void error_path_probe(int64_t value) {
  TORCH_CHECK(false, "pyeff._C error path probe: ", static_cast<uint64_t>(value), " ",
              0.5 * static_cast<double>(value));
}

bool built_with_cuda() {
#ifdef PYEFF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void stream_inplace_cpu(at::TensorList read_write, at::TensorList read_only) {
  constexpr const char* op = "stream_inplace";
  TORCH_CHECK(!read_write.empty() && read_write.size() <= 4 && read_only.size() <= 4, op,
              ": expected 1 to 4 read-write arrays and at most 4 read-only arrays");
  cpu::StreamArgs a;
  a.numel = read_write[0].numel();
  auto check = [&](const char* name, size_t i, const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.numel() == a.numel,
                op, ": expected ", name, "[", i, "] to be a contiguous float32 CPU tensor of ", a.numel,
                " elements");
  };
  for (size_t i = 0; i < read_write.size(); ++i) {
    check("read_write", i, read_write[i]);
    a.read_write.push_back(read_write[i].data_ptr<float>());
  }
  for (size_t i = 0; i < read_only.size(); ++i) {
    check("read_only", i, read_only[i]);
    a.read_only.push_back(read_only[i].const_data_ptr<float>());
  }
  PYEFF_ISA_SELECT(stream_inplace_kernel)(a);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("error_path_probe(int value) -> ()", &error_path_probe);
  m.def("stream_inplace_cpu(Tensor(a!)[] read_write, Tensor[] read_only) -> ()");
}

TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("stream_inplace_cpu", &stream_inplace_cpu); }

}  // namespace pyeff

// The ops above are reached as torch.ops.pyeff.*; the module's own functions are the list checks
// and the fast entry to the in-place ops (NOTE [calling an op from Python]).
PyMODINIT_FUNC PyInit__C(void) {
  static std::vector<PyMethodDef> methods;
  for (PyMethodDef* table : {pyeff::list_check_methods(), pyeff::op_call_methods()}) {
    for (; table->ml_name != nullptr; ++table) methods.push_back(*table);
  }
  methods.push_back({nullptr, nullptr, 0, nullptr});
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods.data()};
  return PyModule_Create(&module);
}
