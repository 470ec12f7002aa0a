"""pyeff.optim.SGD and the sgd_step op.

- op level: every backend against the reference on random inputs (all dtypes and low-precision
  modes, momentum buffers taking their first step beside older ones, sizes that are no multiple of
  any vector width) with poisoned outputs, a hypothesis property test, and a table of bad inputs
  that must raise before anything is written;
- optimizer level: parity with torch.optim.SGD on PyTorch's own optimizer test inputs (optim_db)
  and their error inputs, state and checkpoints both ways, schedulers, closures, parameter groups,
  bad steps that raise before any write. The mixed-precision step is tested with the other
  optimizers' in test_amp.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import pyeff
from pyeff.ops import OPS
from pyeff.ops.sgd import SGD, sgd_step

SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
OPTIM_INPUTS = SGD_INFO.optim_inputs_func(device="cpu")
ERROR_INPUTS = SGD_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)

BACKENDS = [b for b in OPS["sgd_step"].backends() if b != "reference" and
            pyeff.ops.backend_usable(b, torch.device("cpu")) is None]
# Sizes that are no multiple of any vector width or block (16/32/64 elements), and past the grain.
SIZES = (1, 3, 31, 33, 100, 1000, 40_001)
# Backend vs reference: the same operations in the same order; 1 ulp of the stored dtype.
OP_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-13, atol=1e-15),
          torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=1e-5)}
# pyeff.optim.SGD vs torch.optim.SGD after several steps: torch's add_(alpha=) may contract a
# multiply-add into one rounding, pyeff rounds each operation.
PARITY = {torch.float32: dict(rtol=2e-5, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-14)}
LISTS = ("params", "grads", "momentum_buffers", "is_first_step", "master_params", "compensations")


# ---------------------------------------------------------------------------------------------- op


def _op_inputs(sizes, dtype, grad_dtype=None, mode="plain", momentum=True, seed=0):
    """Random inputs, never zeros; every third momentum buffer takes its first step and is NaN (an
    output only: a kernel that reads it, or forgets to write it, fails)."""
    g = torch.Generator().manual_seed(seed)
    state = torch.float32 if mode == "master" else dtype
    masters = [torch.randn(n, generator=g) for n in sizes] if mode == "master" else []
    params = [m.to(dtype) for m in masters] if masters else [torch.randn(n, generator=g).to(dtype) for n in sizes]
    first = [k % 3 == 0 for k in range(len(sizes))] if momentum else []
    bufs = [torch.full((n,), float("nan"), dtype=state) if f else (0.1 * torch.randn(n, generator=g)).to(state)
            for n, f in zip(sizes, first)]
    return dict(
        params=params,
        grads=[torch.randn(n, generator=g).to(grad_dtype or dtype) for n in sizes],
        momentum_buffers=bufs,
        is_first_step=first,
        master_params=masters,
        compensations=[(1e-3 * torch.randn(n, generator=g)).to(dtype) for n in sizes] if mode == "kahan" else [],
    )


def _clone(x):
    return {k: list(v) if k == "is_first_step" else [t.clone() for t in v] for k, v in x.items()}


def _assert_close_lists(got, want):
    if got["compensations"]:
        # Compensated summation: a 1-ulp difference in the fp32 update may round the parameter the
        # other way, and the compensation then differs by that ulp too; parameter + compensation
        # (what the pair represents) agrees to one ulp of the compensation.
        for i, (p, c, q, d) in enumerate(zip(got["params"], got["compensations"], want["params"],
                                             want["compensations"])):
            torch.testing.assert_close(p.float() + c.float(), q.float() + d.float(), rtol=4e-5, atol=1e-6,
                                       msg=lambda m, i=i: f"params+compensations[{i}]: {m}")
    for key in ("params", "momentum_buffers", "master_params"):
        if got["compensations"] and key == "params":
            continue
        for i, (a, b) in enumerate(zip(got[key], want[key])):
            assert not a.isnan().any(), f"{key}[{i}] holds NaN"
            torch.testing.assert_close(a, b, **OP_TOL[a.dtype], msg=lambda m, key=key, i=i: f"{key}[{i}]: {m}")


MODES = [(torch.float32, torch.float32, "plain"), (torch.float64, torch.float64, "plain"),
         (torch.bfloat16, torch.bfloat16, "plain"), (torch.float16, torch.float16, "plain"),
         (torch.bfloat16, torch.bfloat16, "master"), (torch.float16, torch.float32, "master"),
         (torch.bfloat16, torch.bfloat16, "kahan"), (torch.float16, torch.bfloat16, "kahan"),
         (torch.float32, torch.bfloat16, "plain")]
HYPER = {
    "plain": dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    "momentum-wd": dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=False, maximize=False),
    "dampening-maximize": dict(lr=0.03, momentum=0.8, dampening=0.3, weight_decay=0.0, nesterov=False,
                               maximize=True),
    "nesterov": dict(lr=0.01, momentum=0.5, dampening=0.0, weight_decay=0.02, nesterov=True, maximize=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,grad_dtype,mode", MODES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("hyper", list(HYPER))
@pytest.mark.parametrize("grad_mult", [None, 0.37], ids=["no-mult", "mult"])
def test_backend_matches_reference(backend, dtype, grad_dtype, mode, hyper, grad_mult):
    hp = HYPER[hyper]
    inputs = _op_inputs(SIZES, dtype, grad_dtype, mode, momentum=hp["momentum"] != 0)
    ref, got = _clone(inputs), _clone(inputs)
    if mode == "master":  # the parameter is an output only: poison it
        for p in got["params"]:
            p.fill_(float("nan"))
    mult = None if grad_mult is None else torch.tensor(grad_mult)
    sgd_step(**ref, **hp, grad_mult=mult, backend="reference")
    sgd_step(**got, **hp, grad_mult=mult, backend=backend)
    _assert_close_lists(got, ref)
    if dtype in (torch.float32, torch.float64):  # every element was updated
        for a, b in zip(inputs["params"], got["params"]):
            assert (a != b).all()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_found_inf_skips_everything_bitwise(backend):
    inputs = _op_inputs((5, 77, 40), torch.bfloat16, mode="master")
    got = _clone(inputs)
    sgd_step(**got, **HYPER["momentum-wd"], grad_mult=torch.tensor(2.0), found_inf=torch.tensor(1.0), backend=backend)
    for key in ("params", "momentum_buffers", "master_params"):
        for a, b in zip(got[key], inputs[key]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key  # the bits, NaN included


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_is_read_like_a_float(backend):
    inputs = _op_inputs((5, 1000), torch.float32)
    a, b = _clone(inputs), _clone(inputs)
    hp = {k: v for k, v in HYPER["nesterov"].items() if k != "lr"}
    sgd_step(**a, **hp, lr=torch.tensor(0.02, dtype=torch.float64), backend=backend)
    sgd_step(**b, **hp, lr=0.02, backend=backend)
    for key in ("params", "momentum_buffers"):
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y)


def test_op_bumps_version_counters():
    inputs = _op_inputs((5, 37), torch.float32)
    versions = {k: [t._version for t in v] for k, v in inputs.items() if k != "is_first_step"}
    sgd_step(**inputs, **HYPER["momentum-wd"], backend="cpu")
    for key in ("params", "momentum_buffers"):
        assert all(t._version > v for t, v in zip(inputs[key], versions[key])), key
    assert all(t._version == v for t, v in zip(inputs["grads"], versions["grads"]))


def test_non_dense_tensors_are_updated_in_place():
    base = torch.randn(20, 30)
    p = base[:, ::3]  # a strided view: the kernel runs on dense copies, results land in the view
    inputs = dict(params=[p], grads=[torch.randn(20, 10)], momentum_buffers=[torch.randn(10, 20).t()],
                  is_first_step=[False], master_params=[], compensations=[])
    ref = _clone(inputs)
    sgd_step(**ref, **HYPER["momentum-wd"], backend="reference")
    sgd_step(**inputs, **HYPER["momentum-wd"])
    torch.testing.assert_close(p, ref["params"][0], **OP_TOL[torch.float32])
    torch.testing.assert_close(inputs["momentum_buffers"][0], ref["momentum_buffers"][0], **OP_TOL[torch.float32])
    assert p.data_ptr() == base.data_ptr()


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    combo=st.sampled_from(MODES),
    lr=st.floats(1e-4, 1.0), momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]), dampening=st.sampled_from([0.0, 0.1]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]), nesterov=st.booleans(), maximize=st.booleans(),
    grad_mult=st.sampled_from([None, 0.5, 3.0]), seed=st.integers(0, 2**31 - 1),
)
def test_property_cpu_matches_reference(sizes, combo, lr, momentum, dampening, weight_decay, nesterov, maximize,
                                        grad_mult, seed):
    dtype, grad_dtype, mode = combo
    nesterov = nesterov and momentum > 0
    hp = dict(lr=lr, momentum=momentum, dampening=0.0 if nesterov else dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize, grad_mult=None if grad_mult is None else torch.tensor(grad_mult))
    inputs = _op_inputs(sizes, dtype, grad_dtype, mode, momentum=momentum != 0, seed=seed)
    ref, got = _clone(inputs), _clone(inputs)
    sgd_step(**ref, **hp, backend="reference")
    sgd_step(**got, **hp, backend="cpu")
    _assert_close_lists(got, ref)


def test_custom_op_passes_opcheck():
    inputs = _op_inputs((5, 37), torch.float32)
    args = [inputs[k] for k in LISTS] + [0.01, 0.9, 0.1, 0.1, False, True, torch.tensor(0.5), torch.tensor(0.0), None]
    torch.library.opcheck(SGD.overload("cpu"), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_lower_isa_variants_agree(tmp_path, run_with_isa):
    # Every per-ISA build computes the same bits (same operations, no contraction).
    code = """
import sys, torch, pyeff
torch.manual_seed(0)
ps = [torch.randn(1003), torch.randn(77)]
gs = [torch.randn(1003), torch.randn(77)]
bs = [torch.randn(1003), torch.empty(77)]
torch.ops.pyeff.sgd_step.cpu(ps, gs, bs, [False, True], [], [], lr=0.1, momentum=0.9, dampening=0.1,
    weight_decay=0.01, nesterov=False, maximize=True, grad_mult=torch.tensor(0.5))
torch.save(ps + bs, sys.argv[1])
"""
    outs = []
    for isa in ("avx512", "avx2", "default"):
        path = tmp_path / f"{isa}.pt"
        run_with_isa(code, isa, path)
        outs.append(torch.load(path))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- op bad inputs


def _edit(key, i, value):
    def mutate(x):
        x[key][i] = value(x[key][i]) if callable(value) else value
    return mutate


BAD_OP = [
    ("grads list too short", lambda x: x.update(grads=x["grads"][:1]), r"expected grads to hold 2 tensors"),
    ("grad dtype", _edit("grads", 1, lambda g: g.double()), r"grads\[1\] to be Float, got Double"),
    ("grad shape", _edit("grads", 1, torch.randn(7)), r"grads\[1\] of shape \[37\]"),
    ("buffer dtype", _edit("momentum_buffers", 0, lambda b: b.half()), r"momentum_buffers\[0\] to be Float, got Half"),
    ("buffer layout", _edit("momentum_buffers", 1, torch.rand(74)[::2]), r"momentum_buffers\[1\] to be dense"),
    ("too few buffers", lambda x: x.update(momentum_buffers=x["momentum_buffers"][:1]),
     r"expected momentum_buffers to hold 2 tensors"),
    ("too few flags", lambda x: x.update(is_first_step=[True]), r"expected is_first_step to hold 2 flags"),
    ("int params", lambda x: x.update(params=[p.int() for p in x["params"]], grads=[g.int() for g in x["grads"]]),
     r"expected floating-point parameters"),
    ("master for fp32", lambda x: x.update(master_params=[p.clone() for p in x["params"]]),
     r"master weights and compensated summation are for bfloat16/float16"),
    ("lr tensor numel", None, r"expected lr_tensor to have one element"),
    ("grad_mult dtype", None, r"expected grad_mult to be float32"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what,mutate,match", BAD_OP, ids=[b[0] for b in BAD_OP])
def test_bad_op_inputs_raise_before_writing(backend, what, mutate, match):
    inputs = _op_inputs((5, 37), torch.float32)
    inputs["momentum_buffers"][0].normal_()  # no NaN: every tensor's bits are compared below
    if mutate is not None:
        mutate(inputs)
    snap = _clone(inputs)
    controls = dict(lr_tensor=torch.zeros(2) if what == "lr tensor numel" else None,
                    grad_mult=torch.tensor(2.0, dtype=torch.float64) if what == "grad_mult dtype" else None)
    with pytest.raises(RuntimeError, match=match):
        SGD.overload(backend)(*[inputs[k] for k in LISTS], lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.1,
                              nesterov=False, maximize=False, **controls)
    for key in LISTS:
        if key != "is_first_step":
            for a, b in zip(inputs[key], snap[key]):
                assert torch.equal(a, b), key


# ------------------------------------------------------------------------- optimizer: torch parity

SHAPES = [(5, 3), (7,), (1,), (2, 3, 4), (1000,)]


def _make_params(dtype, shapes=SHAPES, seed=0, complex_too=False):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    if complex_too:
        ps.append(torch.randn(4, 3, generator=gen, dtype=dtype).to(torch.complex64 if dtype == torch.float32
                                                                   else torch.complex128))
    return ps


def _pair(params, torch_kwargs, pyeff_kwargs=None):
    a = [torch.nn.Parameter(p.clone()) for p in params]
    b = [torch.nn.Parameter(p.clone()) for p in params]
    kw_b = copy.deepcopy(torch_kwargs if pyeff_kwargs is None else pyeff_kwargs)
    return a, b, torch.optim.SGD(a, **copy.deepcopy(torch_kwargs)), pyeff.optim.SGD(b, **kw_b)


def _set_grads(seed, *param_lists):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in param_lists[0]]
    for ps in param_lists:
        for p, g in zip(ps, grads):
            p.grad = g.clone()


def _train(params, opt, steps, seed):
    for step in range(steps):
        _set_grads(seed + step, params)
        opt.step()


def _assert_optimizers_match(a, b, opt_a, opt_b, dtype):
    """Parameters close, and the same state layout (keys, dtypes), values close."""
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(y.detach(), x.detach(), **PARITY[dtype], msg=lambda m, i=i: f"param {i}: {m}")
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), (k, sa[k].keys(), sb[k].keys())
        for key in sa[k]:
            assert sa[k][key].dtype == sb[k][key].dtype
            torch.testing.assert_close(sb[k][key], sa[k][key], **PARITY[dtype], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=[o.desc for o in OPTIM_INPUTS])
@pytest.mark.parametrize("impl", [{}, {"foreach": True}, {"fused": True}], ids=["default", "foreach", "fused"])
def test_parity_with_torch_on_optim_db_inputs(dtype, optim_input, impl):
    kwargs = {**optim_input.kwargs, **impl}
    a, b, opt_a, opt_b = _pair(_make_params(dtype, complex_too=not impl.get("fused")), kwargs)
    for step in range(12):
        _set_grads(step, a, b)
        opt_a.step()
        opt_b.step()
    _assert_optimizers_match(a, b, opt_a, opt_b, dtype)
    ga, gb = opt_a.state_dict()["param_groups"][0], opt_b.state_dict()["param_groups"][0]
    assert {k: v for k, v in gb.items() if k in ga} == ga  # torch's keys and values, plus pyeff's extras


@pytest.mark.parametrize("error_input", ERROR_INPUTS, ids=[e.optimizer_error_input.desc for e in ERROR_INPUTS])
def test_error_inputs_raise_like_torch(error_input):
    inp = error_input.optimizer_error_input
    for cls in (torch.optim.SGD, pyeff.optim.SGD):
        params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(2, 2))]
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    cls(params, **inp.kwargs)
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    cls(params, **inp.kwargs)
        else:
            opt = cls(params, **inp.kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                opt.step()


CONSTRUCTOR_ERRORS = [
    (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (dict(weight_decay=torch.tensor(-0.1)), ValueError, "Invalid weight_decay value"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
    (dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "Nesterov momentum requires a momentum"),
    (dict(lr=-1.0, momentum=-1.0), ValueError, "Invalid learning rate"),  # torch's order: lr first
    (dict(momentum=-1.0, weight_decay=-1.0), ValueError, "Invalid momentum value"),
    (dict(weight_decay=-1.0, nesterov=True), ValueError, "Invalid weight_decay value"),
    (dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support `differentiable`"),
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together."),
]


@pytest.mark.parametrize("kwargs,error,regex", CONSTRUCTOR_ERRORS, ids=[str(c[0]) for c in CONSTRUCTOR_ERRORS])
def test_constructor_errors_match_torch(kwargs, error, regex):
    for cls in (torch.optim.SGD, pyeff.optim.SGD):
        with pytest.raises(error, match=regex):
            cls([torch.nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("kwargs,error,regex", [
    (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm value: 0.0"),
    (dict(backend="gpu"), ValueError, "Invalid backend: 'gpu'"),
    (dict(master_weights=True, kahan_summation=True), RuntimeError, "`master_weights` and `kahan_summation`"),
    (dict(differentiable=True, master_weights=True), RuntimeError, "`differentiable` does not support"),
])
def test_extra_argument_errors(kwargs, error, regex):
    with pytest.raises(error, match=regex):
        pyeff.optim.SGD([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_defaults_match_torch():
    p = [torch.nn.Parameter(torch.randn(3))]
    ta, pa = torch.optim.SGD(p).defaults, pyeff.optim.SGD(p).defaults
    assert {k: v for k, v in pa.items() if k in ta} == ta


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_is_created_like_torch(momentum):
    # No state before the first step; then a momentum_buffer per parameter with a gradient, equal
    # to its first (decayed) gradient; without momentum no state at all.
    a, b, opt_a, opt_b = _pair(_make_params(torch.float32), dict(lr=0.1, momentum=momentum, weight_decay=0.1))
    assert opt_a.state_dict()["state"] == opt_b.state_dict()["state"] == {}
    _set_grads(0, a, b)
    a[1].grad = b[1].grad = None
    before = [p.detach().clone() for p in b]
    opt_a.step()
    opt_b.step()
    _assert_optimizers_match(a, b, opt_a, opt_b, torch.float32)
    assert set(opt_b.state_dict()["state"]) == ({0, 2, 3, 4} if momentum else set())
    if momentum:
        for i in (0, 2, 3, 4):
            assert torch.equal(opt_b.state[b[i]]["momentum_buffer"], b[i].grad + 0.1 * before[i])
            assert opt_b.state[b[i]]["momentum_buffer"].stride() == b[i].stride()


@pytest.mark.parametrize("direction", ["pyeff_to_torch", "torch_to_pyeff"])
@pytest.mark.parametrize("kwargs", [dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
                                    dict(lr=torch.tensor(0.05), momentum=0.8, dampening=0.2, maximize=True),
                                    dict(lr=0.1)], ids=["nesterov", "tensor-lr-dampening", "no-momentum"])
def test_checkpoint_moves_both_ways_and_training_continues_identically(direction, kwargs, tmp_path):
    params = _make_params(torch.float32, complex_too=True)
    src_cls, dst_cls = ((pyeff.optim.SGD, torch.optim.SGD) if direction == "pyeff_to_torch"
                        else (torch.optim.SGD, pyeff.optim.SGD))
    src = [torch.nn.Parameter(p.clone()) for p in params]
    opt_src = src_cls(src, **copy.deepcopy(kwargs))
    _train(src, opt_src, 4, seed=0)
    torch.save({"params": [p.detach() for p in src], "opt": opt_src.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt")
    dst = [torch.nn.Parameter(p.clone()) for p in ckpt["params"]]
    opt_dst = dst_cls(dst, **copy.deepcopy(kwargs))
    opt_dst.load_state_dict(ckpt["opt"])
    _train(src, opt_src, 5, seed=100)
    _train(dst, opt_dst, 5, seed=100)
    a, b, opt_a, opt_b = ((dst, src, opt_dst, opt_src) if dst_cls is torch.optim.SGD
                          else (src, dst, opt_src, opt_dst))
    _assert_optimizers_match(a, b, opt_a, opt_b, torch.float32)


def test_momentum_turned_on_after_a_checkpoint_without_it():
    # A checkpoint trained without momentum has no buffers: the first step with momentum creates
    # them from the gradient, as torch does.
    params = _make_params(torch.float32)
    a, b, opt_a, opt_b = _pair(params, dict(lr=0.1))
    _train(a, opt_a, 2, seed=0)
    _train(b, opt_b, 2, seed=0)
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["momentum"] = 0.9
    _train(a, opt_a, 3, seed=10)
    _train(b, opt_b, 3, seed=10)
    _assert_optimizers_match(a, b, opt_a, opt_b, torch.float32)


def test_lr_scheduler_closure_zero_grad_and_params_without_grads():
    a, b, opt_a, opt_b = _pair(_make_params(torch.float32), dict(lr=0.1, momentum=0.9))
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    for step in range(6):
        _set_grads(step, a, b)
        a[1].grad = b[1].grad = None  # a parameter without a gradient is skipped, it gets no buffer
        loss_a = opt_a.step(lambda: torch.tensor(1.0))
        loss_b = opt_b.step(lambda: torch.tensor(1.0))
        assert loss_a == loss_b
        sched_a.step()
        sched_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    _assert_optimizers_match(a, b, opt_a, opt_b, torch.float32)
    assert b[1] not in opt_b.state


def test_add_param_group_starts_its_own_momentum():
    torch.manual_seed(0)
    model_t = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    model_p = copy.deepcopy(model_t)
    x, y = torch.randn(11, 7), torch.randn(11, 1)
    ot = torch.optim.SGD(model_t[0].parameters(), lr=0.01, momentum=0.9)
    op = pyeff.optim.SGD(model_p[0].parameters(), lr=0.01, momentum=0.9)
    for step in range(8):
        if step == 3:
            ot.add_param_group({"params": model_t[2].parameters(), "lr": 0.03, "nesterov": True})
            op.add_param_group({"params": model_p[2].parameters(), "lr": 0.03, "nesterov": True})
        for model, opt in ((model_t, ot), (model_p, op)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    _assert_optimizers_match(list(model_t.parameters()), list(model_p.parameters()), ot, op, torch.float32)


def test_differentiable_runs_torchs_implementation():
    # Non-leaf parameters (as torch's differentiable tests use): the update is recorded by autograd.
    leaves = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(3,), (2, 2)]]
    a, b = [w.clone() for w in leaves], [w.clone() for w in leaves]
    opt_a = torch.optim.SGD(a, lr=0.1, momentum=0.9, differentiable=True)
    opt_b = pyeff.optim.SGD(b, lr=0.1, momentum=0.9, differentiable=True)
    for step in range(3):
        _set_grads(step, a, b)
        opt_a.step()
        opt_b.step()
    _assert_optimizers_match(a, b, opt_a, opt_b, torch.float64)
    assert b[0].grad_fn is not None
    torch.autograd.grad(sum(p.sum() for p in b), leaves)


def test_zero_size_and_non_contiguous_parameters():
    base_a = torch.randn(8, 9)
    base_b = base_a.clone()
    pa = [torch.nn.Parameter(torch.randn(0)), torch.nn.Parameter(base_a.t()), torch.nn.Parameter(torch.randn(4, 10))]
    pb = [torch.nn.Parameter(pa[0].detach().clone()), torch.nn.Parameter(base_b.t()),
          torch.nn.Parameter(pa[2].detach().clone())]
    opt_a = torch.optim.SGD(pa, lr=0.1, momentum=0.9, weight_decay=0.1)
    opt_b = pyeff.optim.SGD(pb, lr=0.1, momentum=0.9, weight_decay=0.1)
    for step in range(3):
        _set_grads(step, pa, pb)
        pa[2].grad = pa[2].grad.t().contiguous().t()  # a gradient in another layout than its parameter
        pb[2].grad = pb[2].grad.t().contiguous().t()
        opt_a.step()
        opt_b.step()
    _assert_optimizers_match(pa, pb, opt_a, opt_b, torch.float32)


def test_deepcopy_and_pickle_keep_the_extras():
    opt = pyeff.optim.SGD([torch.nn.Parameter(torch.randn(3))], momentum=0.9, max_grad_norm=1.0, backend="reference")
    copied = copy.deepcopy(opt)
    assert copied.max_grad_norm == 1.0 and copied.backend == "reference"
    assert copied.param_groups[0]["momentum"] == 0.9


# -------------------------------------------------------------------------- bad steps, no writes


def _bad_grad_dtype(params, opt):
    params[2].grad.data = params[2].grad.data.double()  # .data bypasses the grad setter's checks


def _bad_grad_shape(params, opt):
    params[2].grad.data = torch.randn(3)


def _sparse_grad(params, opt):
    params[2].grad = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.randn(2, 2, 4), params[2].shape)


def _bad_lr(params, opt):
    opt.param_groups[1]["lr"] = -0.5  # groups can be edited after construction


def _bad_nesterov(params, opt):
    opt.param_groups[1]["dampening"] = 0.5


BAD_STEPS = [
    ("grad dtype", _bad_grad_dtype, RuntimeError, "a gradient of dtype torch.float64 for a parameter of dtype"),
    ("grad shape", _bad_grad_shape, RuntimeError, r"a gradient of shape \(3,\) for a parameter of shape"),
    ("sparse grad", _sparse_grad, RuntimeError, "sparse gradients are not supported by the fused step"),
    ("lr edited", _bad_lr, ValueError, "Invalid learning rate: -0.5"),
    ("dampening with nesterov", _bad_nesterov, ValueError, "Nesterov momentum requires a momentum and zero"),
]


@pytest.mark.parametrize("name,corrupt,error,regex", BAD_STEPS, ids=[b[0] for b in BAD_STEPS])
def test_bad_step_inputs_raise_before_anything_is_written(name, corrupt, error, regex):
    # The bad input is in the last group: nothing of the first one may be written either.
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6,), (4, 2), (3, 2, 4)]]
    opt = pyeff.optim.SGD([{"params": params[:1]}, {"params": params[1:], "nesterov": True}], lr=0.1, momentum=0.9)
    _train(params, opt, 2, seed=0)
    _set_grads(7, params)
    corrupt(params, opt)
    values = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(error, match=regex):
        opt.step()
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    for idx, st_before in state.items():
        for key, value in st_before.items():
            assert torch.equal(opt.state_dict()["state"][idx][key], value)
