"""Backend selection: the one place that decides which implementation of an op runs.

Each op (pyeff/ops/<op>.py) registers one implementation per backend, all with the reference's
signature. A backend requested explicitly (the `backend=` argument, else the PYEFF_BACKEND
environment variable) must exist and be usable for the tensors' device, or the call raises. The
automatic choice takes the fastest usable one for the device and falls back quietly.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from .. import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Automatic preference per device type. Triton runs on the CPU only through its interpreter, which
# is for tests: it is used there only when asked for.
_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_NOT_PROBED = object()
_interpreter_problem = _NOT_PROBED


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run pyeff's kernels here, or None (probed once)."""
    global _interpreter_problem
    if _interpreter_problem is _NOT_PROBED:
        from pyeff.kernels._probe import interpreter_problem as probe

        _interpreter_problem = probe()
    return _interpreter_problem


def backend_usable(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run on `device`, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, these are on {device}"
        return None if _ext.available() else f"pyeff._C is not built; {_ext.BUILD_HINT}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        return None if _ext.built_with_cuda() else "pyeff._C was built without CUDA (torch without CUDA or no nvcc)"
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return interpreter_problem()
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), these are on {device}"
    return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}"


class Op:
    """One op's implementations by backend."""

    def __init__(self, name: str):
        self.name = name
        self.impls: dict[str, Callable] = {}

    def register(self, backend: str) -> Callable[[Callable], Callable]:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = fn
            return fn

        return deco

    def choose(self, device: torch.device, backend: str | None = None) -> str:
        """The backend that will run this op on `device`."""
        requested = backend or os.environ.get("PYEFF_BACKEND") or None
        if requested is not None:
            if requested not in self.impls:
                have = ", ".join(sorted(self.impls))
                raise RuntimeError(f"pyeff.ops.{self.name}: backend `{requested}` is not implemented for this op "
                                   f"(it has: {have}); pass another `backend=` or unset PYEFF_BACKEND")
            why = backend_usable(requested, device)
            if why is not None:
                raise RuntimeError(f"pyeff.ops.{self.name}: backend `{requested}` cannot run here: {why}")
            return requested
        for candidate in _PREFERENCE.get(device.type, ("reference",)):
            if candidate in self.impls and backend_usable(candidate, device) is None:
                return candidate
        return "reference"

    def __call__(self, backend: str, *args, **kwargs):
        return self.impls[backend](*args, **kwargs)

    def run(self, custom_op: Callable, backend: str, *args):
        """Run the chosen backend. Eager calls go straight to it (the C++ kernels keep autograd's
        version counters themselves); under torch.compile the registered custom op, with its fake
        implementation, is what gets traced."""
        if torch.compiler.is_compiling():
            return custom_op(*args, backend)
        return self.impls[backend](*args)
