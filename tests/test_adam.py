"""pyeff.optim.Adam / AdamW against torch.optim.Adam / AdamW, and the adam_step op's backends
against its reference."""

from __future__ import annotations

import copy
from inspect import signature

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import pyeff
from pyeff.ops import adam_step

PAIRS = {"Adam": (torch.optim.Adam, pyeff.optim.Adam), "AdamW": (torch.optim.AdamW, pyeff.optim.AdamW)}
# rtol: the relative agreement with torch these tests require; atol covers elements near zero, where
# rounding noise is absolute (torch's own fused and single-tensor implementations differ by ~5e-9 there).
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-14)}
SHAPES = [(5, 3), (17,), (1,), (2, 3, 7), (1000,)]


def make_params(dtype, shapes=SHAPES, complex_=False):
    out = []
    for s in shapes:
        t = torch.randn(s, dtype=dtype)
        if complex_:
            t = torch.complex(t, torch.randn(s, dtype=dtype))
        out.append(torch.nn.Parameter(t))
    return out


def twin(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(groups):
    """The same fresh random gradients on every list of parameters."""
    for ps in zip(*groups):
        g = torch.randn_like(ps[0])
        for p in ps:
            p.grad = g.clone()


def assert_state_close(o_torch, o_pyeff, tol):
    st, sp = o_torch.state_dict()["state"], o_pyeff.state_dict()["state"]
    assert st.keys() == sp.keys()
    for k in st:
        assert st[k].keys() == sp[k].keys(), (st[k].keys(), sp[k].keys())
        for key in st[k]:
            a, b = st[k][key], sp[k][key]
            if key == "step":
                assert b.dtype == torch.float32 and b.shape == () and a.item() == b.item()
            else:
                torch.testing.assert_close(b, a, **tol)


def run_both(name, kwargs, dtype, steps=10, complex_=False, shapes=SHAPES):
    torch_cls, pyeff_cls = PAIRS[name]
    # torch computes the step size in a tensor lr's (and tensor betas') dtype; pyeff in double. Give
    # those tensors the parameters' dtype so that fp64 runs compare at fp64 precision.
    kwargs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else tuple(b.to(dtype) for b in v)
                  if k == "betas" and isinstance(v[0], torch.Tensor) else v) for k, v in kwargs.items()}
    pt = make_params(dtype, shapes, complex_)
    pp = twin(pt)
    # torch refuses capturable=True for CPU tensors at step time; pyeff's step never syncs anyway and
    # takes it on any device, with the math of capturable=False.
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "capturable"}
    if torch_kwargs.get("decoupled_weight_decay") and "decoupled_weight_decay" not in signature(torch_cls).parameters:
        torch_cls = torch.optim.AdamW  # older torch: Adam lacks the flag; AdamW is that algorithm
        del torch_kwargs["decoupled_weight_decay"]
    ot = torch_cls(pt, **torch_kwargs)
    op = pyeff_cls(pp, **kwargs)
    for _ in range(steps):
        set_grads([pt, pp])
        ot.step()
        op.step()
    return pt, pp, ot, op


# ---------------------------------------------------------------- parity with torch.optim


def _optim_inputs(name):
    info = next(o for o in optim_db if o.optim_cls.__name__ == name)
    return [(i.desc, i.kwargs) for i in info.optim_inputs_func(device="cpu")]


EXTRA = {  # pyeff-relevant configurations beyond torch's own test inputs
    "tensor lr": dict(lr=torch.tensor(0.01)),
    "tensor betas": dict(betas=(torch.tensor(0.8), torch.tensor(0.95))),
    "capturable": dict(capturable=True, weight_decay=0.1),
    "foreach": dict(foreach=True, amsgrad=True),
    "fused": dict(fused=True, maximize=True, weight_decay=0.05),
    "eps and lr": dict(lr=0.05, eps=1e-3, betas=(0.5, 0.9)),
}

CASES = [(name, desc, kw) for name in PAIRS for desc, kw in _optim_inputs(name) + list(EXTRA.items())]
CASES += [("Adam", "decoupled_weight_decay", dict(decoupled_weight_decay=True, weight_decay=0.1))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,desc,kwargs", CASES, ids=[f"{n}-{d}" for n, d, _ in CASES])
def test_matches_torch_optim(name, desc, kwargs, dtype):
    pt, pp, ot, op = run_both(name, kwargs, dtype)
    for a, b in zip(pt, pp):
        torch.testing.assert_close(b, a, **TOL[dtype])
    assert_state_close(ot, op, TOL[dtype])


@pytest.mark.parametrize("name", list(PAIRS))
def test_torch_error_inputs_raise_the_same(name):
    info = next(o for o in optim_db if o.optim_cls.__name__ == name)
    torch_cls, pyeff_cls = PAIRS[name]
    for err in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        if err.error_on != OptimizerErrorEnum.CONSTRUCTION_ERROR:
            continue
        inp = err.optimizer_error_input
        params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(3))]
        if issubclass(err.error_type, Warning):
            with pytest.warns(err.error_type, match=err.error_regex):
                pyeff_cls(params, **inp.kwargs)
        else:
            with pytest.raises(err.error_type, match=err.error_regex):
                pyeff_cls(params, **inp.kwargs)


@pytest.mark.parametrize("name", list(PAIRS))
def test_complex_parameters(name):
    pt, pp, ot, op = run_both(name, dict(weight_decay=0.1, amsgrad=True), torch.float32, complex_=True)
    for a, b in zip(pt, pp):
        torch.testing.assert_close(b, a, **TOL[torch.float32])
    assert_state_close(ot, op, TOL[torch.float32])


def test_non_contiguous_and_zero_size_parameters():
    base = [torch.randn(6, 9), torch.randn(4, 10), torch.randn(0, 3), torch.randn(7)]
    layouts = [lambda t: t.t(), lambda t: t[:, ::2], lambda t: t, lambda t: t]  # dense transposed, strided slice
    pt = [torch.nn.Parameter(f(t.clone())) for f, t in zip(layouts, base)]
    pp = [torch.nn.Parameter(f(t.clone())) for f, t in zip(layouts, base)]
    assert not pt[0].is_contiguous() and not pt[1].is_contiguous()
    ot, op = torch.optim.AdamW(pt, amsgrad=True), pyeff.optim.AdamW(pp, amsgrad=True)
    for _ in range(5):
        set_grads([pt, pp])
        ot.step()
        op.step()
    for a, b in zip(pt, pp):
        torch.testing.assert_close(b, a, **TOL[torch.float32])
        assert b.stride() == a.stride()
    assert_state_close(ot, op, TOL[torch.float32])


def test_gradient_in_another_layout_than_its_parameter():
    pt = make_params(torch.float32, [(8, 5)])
    pp = twin(pt)
    ot, op = torch.optim.Adam(pt), pyeff.optim.Adam(pp)
    g = torch.randn(5, 8).t()  # same shape, transposed strides
    pt[0].grad, pp[0].grad = g.clone(), g.clone()
    assert pp[0].grad.stride() != pp[0].stride()
    ot.step()
    op.step()
    torch.testing.assert_close(pp[0], pt[0], **TOL[torch.float32])


def test_parameters_without_grad_are_skipped():
    ps = make_params(torch.float32)
    before = [p.detach().clone() for p in ps]
    opt = pyeff.optim.Adam(ps)
    for i, p in enumerate(ps):
        p.grad = torch.randn_like(p) if i % 2 == 0 else None
    opt.step()
    for i, (p, b) in enumerate(zip(ps, before)):
        if i % 2:
            assert torch.equal(p, b) and p not in opt.state
        else:
            assert not torch.equal(p, b) and opt.state[p]["step"].item() == 1


def test_closure_zero_grad_and_add_param_group():
    torch.manual_seed(0)
    model_t = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    model_p = copy.deepcopy(model_t)
    x, y = torch.randn(11, 7), torch.randn(11, 1)
    ot = torch.optim.AdamW(model_t[0].parameters(), lr=0.01)
    op = pyeff.optim.AdamW(model_p[0].parameters(), lr=0.01)
    for step in range(8):
        if step == 3:
            ot.add_param_group({"params": model_t[2].parameters(), "lr": 0.03, "amsgrad": True})
            op.add_param_group({"params": model_p[2].parameters(), "lr": 0.03, "amsgrad": True})
        for model, opt in ((model_t, ot), (model_p, op)):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert loss is not None and loss.requires_grad
    for a, b in zip(model_t.parameters(), model_p.parameters()):
        torch.testing.assert_close(b, a, **TOL[torch.float32])
    assert op.param_groups[1]["amsgrad"] and op.param_groups[1]["master_weights"] is False


# ---------------------------------------------------------------- checkpoints and schedulers


@pytest.mark.parametrize("direction", ["pyeff->torch", "torch->pyeff"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_checkpoint_moves_both_ways(name, direction):
    torch_cls, pyeff_cls = PAIRS[name]
    src_cls, dst_cls = (pyeff_cls, torch_cls) if direction == "pyeff->torch" else (torch_cls, pyeff_cls)
    kwargs = dict(lr=0.02, weight_decay=0.1, amsgrad=True)
    ps = make_params(torch.float32)
    src = src_cls(ps, **kwargs)
    for _ in range(4):
        set_grads([ps])
        src.step()
    sd = copy.deepcopy(src.state_dict())
    # Continue in the source optimizer and in a fresh destination optimizer loaded from the checkpoint.
    ps_dst = twin(ps)
    dst = dst_cls(ps_dst, **kwargs)
    dst.load_state_dict(sd)
    for _ in range(5):
        set_grads([ps, ps_dst])
        src.step()
        dst.step()
    for a, b in zip(ps, ps_dst):
        torch.testing.assert_close(b, a, **TOL[torch.float32])
    assert_state_close(src if src_cls is torch_cls else dst, dst if src_cls is torch_cls else src, TOL[torch.float32])


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda e: 0.95),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=6, power=2.0),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.05, 0.1], total_steps=12),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=3),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[3]),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
         torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_lr_schedulers_with_param_groups(sched):
    pt = make_params(torch.float32, [(9, 4), (13,)])
    pp = twin(pt)
    groups = lambda ps: [{"params": [ps[0]], "lr": 0.01}, {"params": [ps[1]], "lr": 0.02, "weight_decay": 0.3}]  # noqa: E731
    ot, op = torch.optim.AdamW(groups(pt)), pyeff.optim.AdamW(groups(pp))
    st, sp = SCHEDULERS[sched](ot), SCHEDULERS[sched](op)
    for step in range(10):
        set_grads([pt, pp])
        ot.step()
        op.step()
        if sched == "ReduceLROnPlateau":
            st.step(1.0)
            sp.step(1.0)
        else:
            st.step()
            sp.step()
        assert [g["lr"] for g in ot.param_groups] == [g["lr"] for g in op.param_groups]
        assert [g["betas"] for g in ot.param_groups] == [g["betas"] for g in op.param_groups]
    for a, b in zip(pt, pp):
        torch.testing.assert_close(b, a, **TOL[torch.float32])


# ---------------------------------------------------------------- bad input


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _assert_unchanged(opt, params, snap):
    ps, state = snap
    for p, b in zip(params, ps):
        assert torch.equal(p, b)
    now = opt.state_dict()["state"]
    assert now.keys() == state.keys()
    for k in now:
        for key in now[k]:
            assert torch.equal(now[k][key], state[k][key])


def _sparse_grad(ps):
    ps[-1].grad = torch.randn_like(ps[-1]).to_sparse()


def _dtype_grad(ps):
    ps[-1].grad_dtype = None  # torch >= 2.9 lets a gradient's dtype differ when asked to
    ps[-1].grad = torch.randn(ps[-1].shape, dtype=torch.float64)


def _bad_group_lr(opt):
    opt.param_groups[0]["lr"] = -0.5


def _bad_group_beta(opt):
    opt.param_groups[0]["betas"] = (0.9, 1.5)


BAD_STEP = [
    ("sparse gradient", _sparse_grad, None, RuntimeError, "does not support sparse gradients"),
    ("gradient dtype", _dtype_grad, None, RuntimeError, "gradient of dtype torch.float64 for a parameter of dtype"),
    ("negative lr in a group", None, _bad_group_lr, ValueError, "Invalid learning rate: -0.5"),
    ("beta2 >= 1 in a group", None, _bad_group_beta, ValueError, "Invalid beta parameter at index 1: 1.5"),
]


@pytest.mark.parametrize("what,break_grads,break_opt,exc,match", BAD_STEP, ids=[b[0] for b in BAD_STEP])
def test_bad_input_raises_before_anything_is_written(what, break_grads, break_opt, exc, match):
    if what == "gradient dtype" and not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype")
    ps = make_params(torch.float32)
    opt = pyeff.optim.AdamW(ps, amsgrad=True)
    set_grads([ps])
    opt.step()  # some state exists already
    set_grads([ps])
    snap = _snapshot(opt, ps)
    if break_grads:
        break_grads(ps)
    if break_opt:
        break_opt(opt)
    with pytest.raises(exc, match=match):
        opt.step()
    _assert_unchanged(opt, ps, snap)


BAD_CONSTRUCTION = [
    (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
    (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together."),
    (dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support `differentiable`"),
    (dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.99))), RuntimeError, "more than one value is ambiguous"),
    (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm value: 0.0"),
    (dict(master_weights=True, kahan_summation=True), RuntimeError, "`master_weights` and `kahan_summation`"),
    (dict(backend="gpu"), ValueError, "Invalid backend: 'gpu'"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CONSTRUCTION, ids=[str(b[0]) for b in BAD_CONSTRUCTION])
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pyeff.optim.Adam(make_params(torch.float32), **kwargs)
    torch_kwargs = {k: v for k, v in kwargs.items() if k not in ("max_grad_norm", "master_weights",
                                                                  "kahan_summation", "backend")}
    if torch_kwargs == kwargs:  # torch's own arguments: torch raises the same
        with pytest.raises(exc, match=match):
            torch.optim.Adam(make_params(torch.float32), **kwargs)


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    ps = make_params(torch.float32, [(3,)])
    set_grads([ps])
    with pytest.raises(RuntimeError, match="backend `cuda` cannot run here: the cuda backend runs on CUDA tensors"):
        pyeff.optim.Adam(ps, backend="cuda").step()
    with pytest.raises(RuntimeError, match="backend `cpu` cannot run here: the cpu backend runs on CPU tensors"):
        pyeff.ops.OPS["adam_step"].choose(torch.device("meta"), "cpu")
    monkeypatch.setenv("PYEFF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend `triton` cannot run here: triton needs CUDA tensors"):
        pyeff.optim.Adam(ps).step()
    monkeypatch.setenv("PYEFF_BACKEND", "reference")
    opt = pyeff.optim.Adam(ps)
    opt.step()
    assert opt.state[ps[0]]["step"].item() == 1


# ---------------------------------------------------------------- the op: backends vs reference


def _op_inputs(sizes, dtype, grad_dtype, mode, amsgrad):
    acc = torch.float32 if dtype != torch.float64 else torch.float64
    sdtype = acc if mode == "master" else dtype
    master = [torch.randn(n, dtype=torch.float32) for n in sizes] if mode == "master" else []
    params = [m.to(dtype) for m in master] if master else [torch.randn(n, dtype=dtype) for n in sizes]
    return dict(
        params=params,
        grads=[torch.randn(n, dtype=grad_dtype) for n in sizes],
        exp_avgs=[torch.randn(n, dtype=sdtype) * 0.1 for n in sizes],
        exp_avg_sqs=[torch.rand(n, dtype=sdtype) * 0.01 for n in sizes],
        max_exp_avg_sqs=[torch.rand(n, dtype=sdtype) * 0.02 for n in sizes] if amsgrad else [],
        state_steps=[torch.tensor(float(torch.randint(0, 50, ()))) for _ in sizes],
        master_params=master,
        compensations=[torch.randn(n, dtype=dtype) * 1e-3 for n in sizes] if mode == "kahan" else [],
    )


def _clone(inputs):
    return {k: [t.clone() for t in v] for k, v in inputs.items()}


# The compiled and Triton backends usable here (Triton through its interpreter on CPU tensors).
OP_BACKENDS = [b for b in pyeff.ops.OPS["adam_step"].backends()
               if b != "reference" and pyeff.ops.backend_usable(b, torch.device("cpu")) is None]
OP_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-6),
          torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=1e-3)}


def check_backend_matches_reference(sizes, dtype, grad_dtype, mode, hp, grad_mult=None, all_change=False,
                                    backend="cpu"):
    inputs = _op_inputs(sizes, dtype, grad_dtype, mode, hp["amsgrad"])
    ref, got = _clone(inputs), _clone(inputs)
    if mode == "master":  # the parameter is an output only: poison it
        for p in got["params"]:
            p.fill_(float("nan"))
    adam_step(**ref, **hp, grad_mult=grad_mult, backend="reference")
    adam_step(**got, **hp, grad_mult=grad_mult, backend=backend)
    for key in ref:
        for a, b in zip(ref[key], got[key]):
            assert not b.isnan().any(), key
            tol = dict(rtol=0, atol=0) if key == "state_steps" else OP_TOL[b.dtype]
            torch.testing.assert_close(b, a, **tol, msg=lambda m, key=key: f"{key}: {m}")
    if all_change:  # every element was written: one left as it was is one the reference left too
        for before, b, r in zip(inputs["params"], got["params"], ref["params"]):
            assert ((before != b) | (before == r)).all()


HP = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
          decoupled_weight_decay=True)


@pytest.mark.parametrize("dtype,grad_dtype,mode", [
    (torch.float32, torch.float32, "plain"), (torch.float64, torch.float64, "plain"),
    (torch.bfloat16, torch.bfloat16, "plain"), (torch.float16, torch.float16, "plain"),
    (torch.bfloat16, torch.bfloat16, "master"), (torch.float16, torch.float16, "master"),
    (torch.bfloat16, torch.float32, "master"), (torch.float16, torch.bfloat16, "kahan"),
    (torch.bfloat16, torch.bfloat16, "kahan"), (torch.float32, torch.bfloat16, "plain"),
])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_backend_matches_reference(dtype, grad_dtype, mode, backend):
    # sizes straddle every vector width and block (8, 16, 32) and the parallel grain
    sizes = [1, 15, 17, 33, 63, 1000, 40_001]
    check_backend_matches_reference(sizes, dtype, grad_dtype, mode, HP, grad_mult=torch.tensor(0.37),
                                    all_change=dtype in (torch.float32, torch.float64), backend=backend)


def test_op_skips_everything_when_found_inf():
    inputs = _op_inputs([5, 37], torch.float32, torch.float32, "plain", True)
    got = _clone(inputs)
    for backend in ("reference", *OP_BACKENDS):
        adam_step(**got, **HP, found_inf=torch.tensor(1.0), backend=backend)
        for key in inputs:
            for a, b in zip(inputs[key], got[key]):
                assert torch.equal(a, b), (backend, key)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_op_bumps_version_counters(backend):
    inputs = _op_inputs([5, 37], torch.float32, torch.float32, "plain", True)
    versions = {k: [t._version for t in v] for k, v in inputs.items()}
    adam_step(**inputs, **HP, backend=backend)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"):
        assert all(t._version > v for t, v in zip(inputs[key], versions[key])), key
    assert all(t._version == v for t, v in zip(inputs["grads"], versions["grads"]))


BAD_OP = [
    ("grads list too short", lambda i: i.update(grads=i["grads"][:1]), "expected grads to hold 2 tensors"),
    ("state dtype", lambda i: i["exp_avgs"].__setitem__(1, i["exp_avgs"][1].double()),
     r"expected exp_avgs\[1\] to be Float, got Double"),
    ("state shape", lambda i: i["exp_avg_sqs"].__setitem__(0, torch.rand(4)),
     r"expected exp_avg_sqs\[0\] of shape \[5\]"),
    ("grad on another device", lambda i: i["grads"].__setitem__(1, torch.empty(37, device="meta")), "Meta"),
    ("step not a scalar", lambda i: i["state_steps"].__setitem__(0, torch.zeros(2)), r"state_steps\[0\] to have one element"),
    ("master and kahan", lambda i: i.update(master_params=[p.float() for p in i["params"]],
                                            compensations=[p.clone() for p in i["params"]]),
     "`master_params` and `compensations` cannot both be given"),
]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("what,mutate,match", BAD_OP, ids=[b[0] for b in BAD_OP])
def test_op_rejects_bad_input_before_writing(what, mutate, match, backend):
    inputs = _op_inputs([5, 37], torch.float32, torch.float32, "plain", True)
    mutate(inputs)
    snap = _clone(inputs)
    with pytest.raises(RuntimeError, match=match):
        pyeff.ops.ADAM.overload(backend)(*[inputs[k] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs",
                                                            "max_exp_avg_sqs", "state_steps", "master_params",
                                                            "compensations")], [], [], [], [],
                                      lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=True,
                                      maximize=False, decoupled_weight_decay=False)
    for key in inputs:
        for a, b in zip(inputs[key], snap[key]):
            assert a.is_meta or torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=6),
    combo=st.sampled_from([(torch.float32, torch.float32, "plain"), (torch.float64, torch.float64, "plain"),
                           (torch.bfloat16, torch.bfloat16, "plain"), (torch.float16, torch.float32, "master"),
                           (torch.bfloat16, torch.bfloat16, "master"), (torch.bfloat16, torch.float16, "kahan")]),
    lr=st.floats(1e-4, 0.1), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999), eps=st.floats(1e-10, 1e-3),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]), amsgrad=st.booleans(), maximize=st.booleans(),
    decoupled=st.booleans(), grad_mult=st.sampled_from([None, 0.5, 3.0]),
)
def test_property_backends_match_reference(sizes, combo, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                           decoupled, grad_mult):
    dtype, grad_dtype, mode = combo
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
              maximize=maximize, decoupled_weight_decay=decoupled)
    for backend in OP_BACKENDS:
        check_backend_matches_reference(sizes, dtype, grad_dtype, mode, hp,
                                        None if grad_mult is None else torch.tensor(grad_mult), backend=backend)


def test_op_traces_under_torch_compile():
    inputs = _op_inputs([5, 37], torch.float32, torch.float32, "plain", False)
    ref = _clone(inputs)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        adam_step(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decay=0.0)

    step(inputs["params"], inputs["grads"], inputs["exp_avgs"], inputs["exp_avg_sqs"], inputs["state_steps"])
    adam_step(ref["params"], ref["grads"], ref["exp_avgs"], ref["exp_avg_sqs"], [], ref["state_steps"], lr=0.01,
              beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
        for a, b in zip(ref[key], inputs[key]):
            torch.testing.assert_close(b, a)


def test_custom_op_passes_opcheck():
    inputs = _op_inputs([5, 37], torch.float32, torch.float32, "plain", True)
    args = [inputs[k] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps",
                                "master_params", "compensations")]
    args += [[], [], [], [], 0.01, 0.9, 0.99, 1e-8, 0.1, True, False, True, None, None, None]
    torch.library.opcheck(torch.ops.pyeff.adam_step.cpu, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---------------------------------------------------------------- torch.compile, meta tensors


@pytest.mark.parametrize("cls,kwargs", [(pyeff.optim.AdamW, dict(max_grad_norm=0.5, amsgrad=True)),
                                        (pyeff.optim.Adagrad, dict(lr_decay=0.1))], ids=["adamw", "adagrad"])
def test_compiling_a_function_that_calls_step(cls, kwargs):
    # PyTorch's "compiling the optimizer" recipe, with a tensor lr as its tutorial has it.
    torch._dynamo.reset()
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [cls(m.parameters(), lr=torch.tensor(0.01), **kwargs) for m in models]

    @torch.compile
    def step():
        opts[0].step()

    for _ in range(3):
        x = torch.randn(5, 8)
        for m in models:
            m.zero_grad()
            m(x).square().sum().backward()
        step()
        opts[1].step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b)
    assert str(opts[0].grad_norm) == str(opts[1].grad_norm)


@pytest.mark.parametrize("cls", [pyeff.optim.Adam, pyeff.optim.AdamW, pyeff.optim.Adagrad])
def test_meta_parameters_take_the_reference_and_fused_raises_as_torch(cls):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1))
    opt = cls(model.parameters(), max_grad_norm=1.0)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    opt.step()  # the reference, which on meta tensors computes nothing and reads nothing
    assert opt.state[next(model.parameters())]["step"].device.type == "meta"
    fused = cls(model.parameters(), fused=True)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        fused.step()
