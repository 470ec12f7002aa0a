"""Loading the compiled extension `pyeff._C`.

Importing it registers the compiled kernels as torch.ops.pyeff.* (CPU, and CUDA where built). When
it is missing or fails to load, pyeff still works: every op falls back to its plain-PyTorch
reference, and one warning says how to build.
"""

import warnings

import torch

BUILD_HINT = (
    "build it from the source tree with `pip install --no-build-isolation -e .` "
    "(a C++17 compiler and ninja are needed; see README.md)"
)


_NOT_TRIED = object()
_error = _NOT_TRIED
_found: dict = {}  # module function name -> pyeff._C or None


def load_error() -> str | None:
    """None when pyeff._C is loaded, else why not (the warning is issued once)."""
    global _error
    if _error is _NOT_TRIED:
        try:
            from pyeff import _C  # noqa: F401
            _error = None
        except (ImportError, OSError) as e:
            _error = str(e)
            warnings.warn(f"pyeff: the compiled extension pyeff._C is not available ({e}); every op falls back "
                          f"to its plain-PyTorch reference, which is correct but slow. To use the fused kernels, "
                          f"{BUILD_HINT}.", RuntimeWarning, stacklevel=3)
    return _error


def available() -> bool:
    return load_error() is None


def list_checks():
    """pyeff._C's C loops over lists of tensors (csrc/list_checks.cpp), or None where it is not built
    or torch.compile is tracing the caller (it cannot trace them); the callers then use their
    Python twins."""
    return _functions("one_bucket")


def op_calls():
    """pyeff._C's fast entry to the in-place ops (`op_handle`, `call_op`: NOTE [calling an op from
    Python] in csrc/op_call.cpp), or None where it is not built or torch.compile is tracing the
    caller; the caller then calls the op's overload."""
    return _functions("call_op")


def _functions(name: str):
    """pyeff._C when it is loaded and has the module function `name` (a build older than that
    function has not), except while torch.compile traces."""
    if torch.compiler.is_compiling():
        return None
    found = _found.get(name, _NOT_TRIED)
    if found is _NOT_TRIED:
        found = None
        if available():
            from pyeff import _C

            found = _C if hasattr(_C, name) else None
        _found[name] = found
    return found


def cpu_isa() -> str | None:
    """The instruction set the CPU kernels run with (default, avx2, avx512), or None if not built."""
    return torch.ops.pyeff.cpu_isa() if available() else None


def built_with_cuda() -> bool:
    return available() and bool(torch.ops.pyeff.built_with_cuda())
