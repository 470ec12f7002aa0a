#pragma once
// The Python functions of pyeff._C (csrc/list_checks.cpp), for the module's method table.
#include <Python.h>

namespace pyeff {
PyMethodDef* list_check_methods();
}
