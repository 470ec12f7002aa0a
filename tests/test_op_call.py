"""pyeff._C's fast entry to the in-place ops (NOTE [calling an op from Python], csrc/op_call.cpp)
against calling the op's overload: the same values, version counts and errors on random inputs, and
the generic path wherever the fast one could differ (grad mode, tensor subclasses, TorchFunctionModes,
argument types it does not convert)."""

from __future__ import annotations

import bisect
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import pyeff
from pyeff import _ext
from pyeff.ops.adagrad import ADAGRAD
from pyeff.ops.sgd import SGD

calls = _ext.op_calls()
pytestmark = pytest.mark.skipif(calls is None, reason="pyeff._C is not built")


def adagrad_args(sizes, dtype=torch.float32, lr=0.1, weight_decay=0.0, maximize=False, grad_mult=None,
                 found_inf=None) -> tuple:
    """adagrad_step's positional arguments, in its schema's order."""
    params = [torch.randn(n, dtype=dtype) for n in sizes]
    grads = [torch.randn(n, dtype=dtype) for n in sizes]
    sums = [torch.rand(n, dtype=dtype) for n in sizes]
    steps = [torch.tensor(float(k)) for k in range(len(sizes))]
    return (params, grads, sums, steps, [], [], [], [], lr, 0.01, weight_decay, 1e-10, maximize, grad_mult, found_inf,
            None)


def clone(args: tuple) -> tuple:
    def copy(x):
        return x.clone() if isinstance(x, torch.Tensor) else x

    return tuple([copy(t) for t in a] if isinstance(a, list) else copy(a) for a in args)


def tensors(args: tuple) -> list[torch.Tensor]:
    return [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]


def run_both(op, backend: str, args: tuple):
    """(fast, generic): each an exception or None, after running the fast entry on `args` and the
    overload on a copy made before either ran; returns the copy too."""
    generic_args = clone(args)
    outcomes = []
    handle = calls.op_handle(op.name, backend)
    for run in (lambda: calls.call_op(handle, args), lambda: op.overload(backend)(*generic_args)):
        try:
            with torch.no_grad():
                outcomes.append(run())
        except Exception as e:  # noqa: BLE001 - compared below
            outcomes.append(e)
    return outcomes, generic_args


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       lr=st.one_of(st.floats(1e-4, 1.0), st.integers(0, 2)), weight_decay=st.sampled_from([0.0, 0.1]),
       maximize=st.booleans(), scaled=st.booleans(), skip=st.booleans())
def test_same_as_the_overload(sizes, dtype, lr, weight_decay, maximize, scaled, skip):
    grad_mult = torch.tensor(0.5) if scaled else None
    found_inf = torch.tensor(float(skip)) if scaled else None
    args = adagrad_args(sizes, dtype, lr, weight_decay, maximize, grad_mult, found_inf)
    (fast, generic), generic_args = run_both(ADAGRAD, "cpu", args)
    assert fast is None and generic is None
    for a, b in zip(tensors(args), tensors(generic_args)):
        assert torch.equal(a, b) and a._version == b._version


def test_same_errors_and_nothing_written():
    bad_shape = adagrad_args([5, 7])
    bad_shape[1][1] = torch.randn(8)
    bad_length = adagrad_args([5, 7])
    bad_length[2].pop()
    meta = adagrad_args([5, 7])
    meta[0][0] = torch.empty(5, device="meta")
    no_tensors = adagrad_args([])  # the dispatcher has no device to go by
    for args in (bad_shape, bad_length, meta, no_tensors):
        before = clone(args)
        (fast, generic), _ = run_both(ADAGRAD, "cpu", args)
        assert isinstance(fast, RuntimeError) and type(fast) is type(generic) and str(fast) == str(generic)
        assert all(torch.equal(a, b) and a._version == b._version
                   for a, b in zip(tensors(args), tensors(before)) if a.device.type != "meta")


class Subclass(torch.Tensor):
    pass


class Passthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_generic_path_where_the_fast_one_could_differ():
    handle = calls.op_handle("adagrad_step", "cpu")
    with torch.no_grad():
        assert calls.call_op(handle, adagrad_args([3])) is None
        subclass = adagrad_args([3, 4])
        subclass[0][1] = subclass[0][1].as_subclass(Subclass)
        not_a_tensor = adagrad_args([3])
        not_a_tensor[1][0] = None
        numpy_lr = adagrad_args([3], lr=np.float64(0.1))  # a float subclass
        for args in (subclass, not_a_tensor, numpy_lr, adagrad_args([3])[:-1]):
            assert calls.call_op(handle, args) is NotImplemented
        with Passthrough():
            assert calls.call_op(handle, adagrad_args([3])) is NotImplemented
    assert calls.call_op(handle, adagrad_args([3])) is NotImplemented  # grad mode on: torch's autograd fallback
    assert calls.op_handle("norm_forward", "cpu") is None  # returns tensors: no fast entry


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_call():
    args = adagrad_args([3, 4])
    with torch.no_grad(), Recorder() as mode:
        assert calls.call_op(calls.op_handle("adagrad_step", "cpu"), args) is None
    assert mode.seen == ["pyeff.adagrad_step.cpu"]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sgd_bool_list_and_python_backends(backend):
    args = (*adagrad_args([5, 9])[:2], [torch.randn(5), torch.randn(9)], [False, True], [], [], 0.1, 0.9, 0.0, 0.0,
            False, False, None, None, None)
    (fast, generic), generic_args = run_both(SGD, backend, args)
    assert fast is None and generic is None
    assert all(torch.equal(a, b) for a, b in zip(tensors(args), tensors(generic_args)))


def test_optimizer_step_takes_it(monkeypatch):
    taken = []

    class Spy:
        op_handle = staticmethod(calls.op_handle)

        @staticmethod
        def call_op(handle, args):
            taken.append(calls.call_op(handle, args))
            return taken[-1]

    monkeypatch.setitem(_ext._found, "call_op", Spy)
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    pyeff.optim.AdamW([p], lr=0.1).step()
    assert taken == [None]


def test_gil_released_while_the_op_runs():
    args = adagrad_args([16_000_000])
    handle = calls.op_handle("adagrad_step", "cpu")
    ticks, stop = [], threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.perf_counter())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spinner = threading.Thread(target=spin)
    spinner.start()
    longest = []  # per call: the spinner's longest pause within the call, as a fraction of the call
    try:
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                assert calls.call_op(handle, args) is None
                t1 = time.perf_counter()
                inside = ticks[bisect.bisect_left(ticks, t0):bisect.bisect_right(ticks, t1)]
                longest.append(np.diff([t0, *inside, t1]).max() / (t1 - t0))
    finally:
        stop.set()
        spinner.join()
        torch.set_num_threads(threads)
    # Holding the GIL would leave one pause as long as the call, in every call; released, the
    # spinner keeps ticking (a GIL hand-over, or the OS running something else, pauses it briefly).
    assert min(longest) < 0.5, longest
