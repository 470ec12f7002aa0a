"""What every pyeff optimizer shares with its torch.optim twin (tests/_optimizers.py: OPTIMIZERS):
parity on PyTorch's own optimizer test inputs (optim_db) and their error inputs, defaults, the
extras' errors, schedulers, closures and parameters without gradients, differentiable=True,
zero-size and non-contiguous parameters, copies, checkpoints both ways, and bad steps that raise
before anything is written."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _optimizers import OPTIMIZERS, assert_optimizers_match, make_params, pair, set_grads, train
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db


def _info(name):
    return next(info for info in optim_db if info.optim_cls is OPTIMIZERS[name].torch_cls)


def _pair(name, params, torch_kwargs, pyeff_kwargs=None):
    return pair(OPTIMIZERS[name].torch_cls, OPTIMIZERS[name].pyeff_cls, params, torch_kwargs, pyeff_kwargs)


OPTIM_INPUTS = [(name, inp) for name in OPTIMIZERS for inp in _info(name).optim_inputs_func(device="cpu")]
ERROR_INPUTS = [(name, err) for name in OPTIMIZERS
                for err in _info(name).optim_error_inputs_func(device="cpu", dtype=torch.float32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,optim_input", OPTIM_INPUTS, ids=[f"{n}-{i.desc}" for n, i in OPTIM_INPUTS])
@pytest.mark.parametrize("impl", [{}, {"foreach": True}, {"fused": True}], ids=["default", "foreach", "fused"])
def test_parity_with_torch_on_optim_db_inputs(name, optim_input, impl, dtype):
    kwargs = {**optim_input.kwargs, **impl}
    if isinstance(kwargs.get("lr"), torch.Tensor):  # the step size in the parameters' precision, as torch's
        kwargs["lr"] = kwargs["lr"].to(dtype)
    params = make_params(dtype, complex_too=not impl.get("fused"))
    try:
        OPTIMIZERS[name].torch_cls([torch.nn.Parameter(p.clone()) for p in params], **kwargs)
    except (ValueError, RuntimeError) as e:  # a combination torch refuses: pyeff refuses it alike
        with pytest.raises(type(e), match=re.escape(str(e))):
            OPTIMIZERS[name].pyeff_cls([torch.nn.Parameter(p.clone()) for p in params], **kwargs)
        return
    a, b, opt_a, opt_b = _pair(name, params, kwargs)
    for step in range(12):
        set_grads(step, a, b)
        opt_a.step()
        opt_b.step()
    assert_optimizers_match(a, b, opt_a, opt_b, dtype)
    ga, gb = opt_a.state_dict()["param_groups"][0], opt_b.state_dict()["param_groups"][0]
    for key, value in ga.items():  # torch's hyper-parameters (pyeff adds its extras)
        assert torch.equal(gb[key], value) if isinstance(value, torch.Tensor) else gb[key] == value, key


@pytest.mark.parametrize("name,error_input", ERROR_INPUTS,
                         ids=[f"{n}-{e.optimizer_error_input.desc}" for n, e in ERROR_INPUTS])
def test_error_inputs_raise_like_torch(name, error_input):
    inp = error_input.optimizer_error_input
    for cls in (OPTIMIZERS[name].torch_cls, OPTIMIZERS[name].pyeff_cls):
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


EXTRA_ERRORS = [
    (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm value: 0.0"),
    (dict(backend="gpu"), ValueError, "Invalid backend: 'gpu'"),
    (dict(master_weights=True, kahan_summation=True), RuntimeError, "`master_weights` and `kahan_summation`"),
    (dict(differentiable=True, master_weights=True), RuntimeError, "`differentiable` does not support"),
]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("kwargs,error,regex", EXTRA_ERRORS, ids=[str(e[0]) for e in EXTRA_ERRORS])
def test_extra_argument_errors(name, kwargs, error, regex):
    with pytest.raises(error, match=regex):
        OPTIMIZERS[name].pyeff_cls([torch.nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_defaults_are_torchs(name):
    p = [torch.nn.Parameter(torch.randn(3))]
    ta, pa = OPTIMIZERS[name].torch_cls(p).defaults, OPTIMIZERS[name].pyeff_cls(p).defaults
    assert {k: v for k, v in pa.items() if k in ta} == ta


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lr_scheduler_closure_zero_grad_and_params_without_grads(name):
    a, b, opt_a, opt_b = _pair(name, make_params(torch.float32), OPTIMIZERS[name].kwargs)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    for step in range(6):
        set_grads(step, a, b)
        a[1].grad = b[1].grad = None  # a parameter without a gradient is skipped: its state stays as torch's
        loss_a = opt_a.step(lambda: torch.tensor(1.0))
        loss_b = opt_b.step(lambda: torch.tensor(1.0))
        assert loss_a == loss_b
        sched_a.step()
        sched_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    assert_optimizers_match(a, b, opt_a, opt_b, torch.float32)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_checks_at_every_step_read_no_device_tensor(name):
    # A tensor lr (or beta) on a GPU is checked at construction; reading it again at every step
    # would make the host wait (and break graph capture). A meta tensor stands in for the GPU one:
    # reading its value raises.
    opt = OPTIMIZERS[name].pyeff_cls(make_params(torch.float32), **OPTIMIZERS[name].kwargs)
    for group in opt.param_groups:
        group["lr"] = torch.tensor(1e-3, device="meta")
        if "betas" in group:
            group["betas"] = (torch.tensor(0.9, device="meta"), torch.tensor(0.999, device="meta"))
    opt._check_inputs()
    opt.param_groups[0]["lr"] = torch.tensor(-1.0)  # a CPU tensor is still read, as torch.optim does
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt._check_inputs()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_differentiable_runs_torchs_implementation(name):
    # Non-leaf parameters (as torch's differentiable tests use): the update is recorded by autograd.
    leaves = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(3,), (2, 2)]]
    a, b = [w.clone() for w in leaves], [w.clone() for w in leaves]
    opt_a = OPTIMIZERS[name].torch(a, differentiable=True)
    opt_b = OPTIMIZERS[name].pyeff(b, differentiable=True)
    for step in range(3):
        set_grads(step, a, b)
        opt_a.step()
        opt_b.step()
    assert_optimizers_match(a, b, opt_a, opt_b, torch.float64)
    assert b[0].grad_fn is not None
    torch.autograd.grad(sum(p.sum() for p in b), leaves)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_size_and_non_contiguous_parameters(name):
    base_a = torch.randn(8, 9)
    base_b = base_a.clone()
    pa = [torch.nn.Parameter(torch.randn(0)), torch.nn.Parameter(base_a.t()), torch.nn.Parameter(torch.randn(4, 10))]
    pb = [torch.nn.Parameter(pa[0].detach().clone()), torch.nn.Parameter(base_b.t()),
          torch.nn.Parameter(pa[2].detach().clone())]
    opt_a, opt_b = OPTIMIZERS[name].torch(pa), OPTIMIZERS[name].pyeff(pb)
    for step in range(3):
        set_grads(step, pa, pb)
        for p in (pa[2], pb[2]):  # a gradient in another layout than its parameter
            p.grad = p.grad.t().contiguous().t()
        opt_a.step()
        opt_b.step()
    assert_optimizers_match(pa, pb, opt_a, opt_b, torch.float32)
    assert pb[1].stride() == base_b.t().stride()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_deepcopy_keeps_the_extras(name):
    opt = OPTIMIZERS[name].pyeff([torch.nn.Parameter(torch.randn(3))], max_grad_norm=1.0, backend="reference")
    copied = copy.deepcopy(opt)
    assert copied.max_grad_norm == 1.0 and copied.backend == "reference"
    assert copied.param_groups[0].keys() == opt.param_groups[0].keys()
    assert copied.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


CHECKPOINTS = [(name, kw) for name in OPTIMIZERS for kw in OPTIMIZERS[name].checkpoints]


@pytest.mark.parametrize("direction", ["pyeff_to_torch", "torch_to_pyeff"])
@pytest.mark.parametrize("name,kwargs", CHECKPOINTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CHECKPOINTS)])
def test_checkpoint_moves_both_ways_and_training_continues_identically(name, kwargs, direction, tmp_path):
    optim = OPTIMIZERS[name]
    src_cls, dst_cls = ((optim.pyeff_cls, optim.torch_cls) if direction == "pyeff_to_torch"
                        else (optim.torch_cls, optim.pyeff_cls))
    src = [torch.nn.Parameter(p) for p in make_params(torch.float32, complex_too=True)]
    opt_src = src_cls(src, **copy.deepcopy(kwargs))
    train(src, opt_src, 4, seed=0)
    torch.save({"params": [p.detach() for p in src], "opt": opt_src.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt")
    dst = [torch.nn.Parameter(p.clone()) for p in ckpt["params"]]
    opt_dst = dst_cls(dst, **copy.deepcopy(kwargs))
    opt_dst.load_state_dict(ckpt["opt"])
    train(src, opt_src, 5, seed=100)
    train(dst, opt_dst, 5, seed=100)
    a, b, opt_a, opt_b = (dst, src, opt_dst, opt_src) if dst_cls is optim.torch_cls else (src, dst, opt_src, opt_dst)
    assert_optimizers_match(a, b, opt_a, opt_b, torch.float32)


def _bad_grad_dtype(params, opt):
    params[2].grad.data = params[2].grad.data.double()  # .data bypasses the grad setter's checks


def _bad_grad_shape(params, opt):
    params[2].grad.data = torch.randn(3)


def _bad_lr(params, opt):
    opt.param_groups[1]["lr"] = -0.5  # groups can be edited after construction


BAD_STEPS = [(name, *bad) for name in OPTIMIZERS for bad in [
    ("grad dtype", _bad_grad_dtype, RuntimeError, "a gradient of dtype torch.float64 for a parameter of dtype"),
    ("grad shape", _bad_grad_shape, RuntimeError, r"a gradient of shape \(3,\) for a parameter of shape"),
    ("lr edited", _bad_lr, ValueError, "Invalid learning rate: -0.5"),
    *OPTIMIZERS[name].bad_steps]]


@pytest.mark.parametrize("name,what,corrupt,error,regex", BAD_STEPS, ids=[f"{b[0]}-{b[1]}" for b in BAD_STEPS])
def test_bad_step_inputs_raise_before_anything_is_written(name, what, corrupt, error, regex):
    # The bad input is in the last group: nothing of the first one may be written either.
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6,), (4, 2), (5,)]]
    opt = OPTIMIZERS[name].pyeff([{"params": params[:1]}, {"params": params[1:]}])
    train(params, opt, 2, seed=0)
    set_grads(7, params)
    corrupt(params, opt)
    values = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(error, match=regex):
        opt.step()
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    after = opt.state_dict()["state"]
    assert after.keys() == state.keys()
    for idx, st_before in state.items():
        assert after[idx].keys() == st_before.keys()
        for key, value in st_before.items():
            assert torch.equal(after[idx][key], value)
