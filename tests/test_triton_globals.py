"""Rules of compiled Triton that the interpreter (where these tests run the kernels) does not enforce."""

import importlib
import pkgutil
import types

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import pyeff.kernels  # noqa: E402


def _jit_functions():
    for info in pkgutil.iter_modules(pyeff.kernels.__path__):
        module = importlib.import_module(f"pyeff.kernels.{info.name}")
        for name, fn in vars(module).items():
            # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1
            if isinstance(fn, triton.runtime.KernelInterface) and fn.fn.__module__ == module.__name__:
                yield f"{info.name}.{name}", fn.fn


def test_kernels_read_no_plain_python_globals():
    # Compiled kernels may read a module global only when it is a tl.constexpr ("Cannot access
    # global variable ... from within @jit'ed function"); the interpreter reads any. A global read
    # through a module (`Q.QUANT_BLOCK`) counts too.
    plain, functions = [], list(_jit_functions())
    assert len(functions) > 20, functions
    for where, fn in functions:
        names = fn.__code__.co_names
        scopes = [fn.__globals__] + [vars(v) for n in names if isinstance(v := fn.__globals__.get(n), types.ModuleType)]
        for name in names:
            for scope in scopes:
                value = scope.get(name)
                if isinstance(value, (bool, int, float, str, tuple)) and not isinstance(value, tl.constexpr):
                    plain.append(f"{where} reads {name} = {value!r}")
    assert not plain, plain
