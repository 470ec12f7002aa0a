"""The op registry: one schema per op, one implementation per backend, the backend choice in one place.

NOTE [one way to reach a kernel]
An op is declared once, by its plain-PyTorch reference (``@Op.reference``): the reference's
annotated signature *is* the op's schema (torch.library.infer_schema, with the op's mutated
arguments). Every backend is an overload of one torch.library op with that schema,
``torch.ops.pyeff.<op>.<backend>``:

- ``reference`` and ``triton`` are Python functions registered here (``@OP.impl("triton")``);
- ``cpu`` and ``cuda`` are the compiled kernels, registered from C++ against the same overloads
  (``TORCH_LIBRARY_IMPL(pyeff, CPU, m) { m.impl("<op>.cpu", ...); }`` in csrc/<op>.cpp, and the
  CUDA key in csrc/cuda/<op>.cu), or a Python function that calls a compiled helper.

An op's public function (pyeff/ops/<op>.py) checks and buckets its inputs, asks :meth:`Op.choose`
for the backend and calls that overload, eagerly and under torch.compile alike (each overload has
the op's fake implementation). Eagerly, the in-place ops (the optimizer step's) are called through
pyeff._C's fast entry where it can take the call: the same overload through the dispatcher, with
the Python arguments converted without torch's per-element generic conversion (NOTE [calling an op
from Python] in csrc/op_call.cpp). A backend requested explicitly (``backend=``, else PYEFF_BACKEND)
must exist and be usable for the tensors' device, or the call raises; the automatic choice takes
the first usable one in the device's preference order and falls back quietly. Tensors on a device
no backend serves (meta, mps, xpu, ...) get the reference.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch

from .. import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Automatic preference per device type. On CUDA the C++ kernels come first: the GPU benchmark
# (benchmarks/optim_gpu.py) measures both, and README.md says which is faster and why. Triton runs
# on the CPU only through its interpreter, which is for tests: it is used there only when asked for.
PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

# The dispatch keys at which the compiled backends register their kernels.
_COMPILED_KEYS = {"cpu": ("CPU", "SparseCPU"), "cuda": ("CUDA", "SparseCUDA")}

_LIB = torch.library.Library("pyeff", "FRAGMENT")
_NOT_MADE = object()
_OPS: dict[str, "Op"] = {}


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run pyeff's kernels here, or None (probed once)."""
    from pyeff.kernels._probe import interpreter_problem as probe

    return probe()


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


def _no_outputs(*args, **kwargs) -> None:
    return None


def _meta_refused(name: str, backend: str, *args, **kwargs):
    raise RuntimeError(f"pyeff.ops.{name}: the {backend} backend got a tensor on the meta device (Meta tensors get "
                       "the reference backend)")


class Op:
    """One op: its schema (from its reference), its fake implementation and its backends."""

    def __init__(self, name: str, *, mutates_args: Sequence[str] = ()):
        _OPS[name] = self
        self.name = name
        self.mutates_args = tuple(mutates_args)
        self.python_impls: dict[str, Callable] = {}  # backend -> function, for the Python backends
        self.checked_backends: set[str] = set()
        self.packet = None  # torch.ops.pyeff.<name>, once defined
        self.handles: dict[str, object] = {}  # backend -> pyeff._C.op_handle (None: the op has none)

    # -- declaration
    def reference(self, fn: Callable) -> Callable:
        """Declare the op from its reference implementation: schema, overloads, reference backend."""
        schema = torch.library.infer_schema(fn, mutates_args=self.mutates_args)
        for backend in BACKENDS:
            _LIB.define(f"{self.name}.{backend}{schema}")
        # The compiled input checks alone (csrc/<op>.h), for the Python backends that write memory
        # through raw addresses (Triton): every check that can fail, before anything is written.
        _LIB.define(f"{self.name}.check{schema}")
        self.packet = getattr(torch.ops.pyeff, self.name)
        self.fake(_no_outputs)
        return self.impl("reference")(fn)

    def fake(self, fn: Callable) -> Callable:
        """The op's output shapes, for torch.compile (the same for every backend). register_fake also
        makes it the Meta kernel: right for the reference (meta tensors get the reference, which
        does nothing there), wrong for another backend given a meta tensor among its own device's
        tensors, which must raise as the kernels do for any other foreign device."""
        for backend in BACKENDS:
            torch.library.register_fake(f"pyeff::{self.name}.{backend}", fn, lib=_LIB, allow_override=True)
            if backend != "reference":
                _LIB.impl(f"{self.name}.{backend}", functools.partial(_meta_refused, self.name, backend), "Meta",
                          allow_override=True)
        return fn

    def impl(self, backend: str, *, checked: bool = False) -> Callable[[Callable], Callable]:
        """Register a Python implementation of `backend` (the reference's signature). `checked`: it
        calls check() first, and exists only where pyeff._C provides the checks."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")

        def deco(fn: Callable) -> Callable:
            _LIB.impl(f"{self.name}.{backend}", fn, "CompositeExplicitAutograd")
            self.python_impls[backend] = fn
            if checked:
                self.checked_backends.add(backend)
            return fn

        return deco

    # -- queries
    def has(self, backend: str) -> bool:
        """Whether this op has an implementation for `backend` (compiled ones: in the loaded pyeff._C)."""
        if backend in self.python_impls:
            return backend not in self.checked_backends or self._has_check()
        keys = _COMPILED_KEYS.get(backend, ())
        return bool(keys) and _ext.available() and any(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"pyeff::{self.name}.{backend}", k) for k in keys)

    def check(self, *args) -> None:
        """Run the op's compiled input checks on these arguments (csrc/<op>.h)."""
        self("check", *args)

    def _has_check(self) -> bool:
        return _ext.available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"pyeff::{self.name}.check", "CompositeExplicitAutograd")

    def backends(self) -> list[str]:
        return [b for b in BACKENDS if self.has(b)]

    def overload(self, backend: str):
        """torch.ops.pyeff.<op>.<backend>."""
        return getattr(self.packet, backend)

    def choose(self, device: torch.device, backend: str | None = None) -> str:
        """The backend that will run this op on `device` (`backend`, else PYEFF_BACKEND, else automatic)."""
        return _choose(self.name, device.type, backend)

    def __call__(self, backend: str, *args):
        """Run `backend` (see choose()) on positional arguments in the schema's order: through
        pyeff._C's fast entry where it takes the call (NOTE [calling an op from Python] in
        csrc/op_call.cpp), else the overload."""
        calls = _ext.op_calls()
        if calls is not None:
            handle = self.handles.get(backend, _NOT_MADE)
            if handle is _NOT_MADE:
                handle = self.handles[backend] = calls.op_handle(self.name, backend)
            if handle is not None and calls.call_op(handle, args) is None:
                return None
        return getattr(self.packet, backend)(*args)


# Under torch.compile the choice is made once, while tracing, and the chosen overload is traced.
# Eagerly it is made once per op, device type, requested backend and TRITON_INTERPRET setting (what
# it depends on besides what the process loaded): asking the dispatcher which kernels exist costs
# tens of microseconds per call with cold caches, as each optimizer step starts.
@torch.compiler.assume_constant_result
def _choose(name: str, device_type: str, backend: str | None) -> str:
    requested = backend or os.environ.get("PYEFF_BACKEND") or None
    key = (name, device_type, requested, os.environ.get("TRITON_INTERPRET"))
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _CHOICES[key] = _first_usable(_OPS[name], torch.device(device_type), requested)
    return choice


_CHOICES: dict[tuple, str] = {}


def _first_usable(op: Op, device: torch.device, requested: str | None) -> str:
    if requested is not None:
        if requested not in BACKENDS:
            raise RuntimeError(f"pyeff.ops.{op.name}: unknown backend `{requested}`; expected one of "
                               f"{', '.join(BACKENDS)}")
        why = backend_usable(requested, device)
        if why is not None:
            raise RuntimeError(f"pyeff.ops.{op.name}: backend `{requested}` cannot run here: {why}")
        if not op.has(requested):
            have = ", ".join(op.backends())
            raise RuntimeError(f"pyeff.ops.{op.name}: backend `{requested}` is not implemented for this op "
                               f"(it has: {have}); pass another `backend=` or unset PYEFF_BACKEND")
        return requested
    for candidate in PREFERENCE.get(device.type, ("reference",)):
        if op.has(candidate) and backend_usable(candidate, device) is None:
            return candidate
    return "reference"
