"""Step plans (NOTE [step plans] in pyeff/optim/_plan.py): a step reuses the op lists of the last
full walk over a group's parameters only while everything the walk read is unchanged. Each edit a
user can make between steps through torch.optim's interface is made on a pyeff optimizer and on
its torch.optim twin, and the two must go on matching; a plan must be reused when nothing changed."""

from __future__ import annotations

import collections.abc
import gc
import weakref
from collections import defaultdict

import pytest
import torch
from _optimizers import OPTIMIZERS, assert_optimizers_match, make_params, pair, set_grads

import pyeff
from pyeff.optim._plan import StepPlan


def _stepped(name, steps=3):
    """Parameters and a pyeff optimizer that has stepped over them (so it keeps a plan)."""
    params = [torch.nn.Parameter(p) for p in make_params(torch.float32)]
    opt = OPTIMIZERS[name].pyeff(params)
    for step in range(steps):
        set_grads(step, params)
        opt.step()
    return params, opt


def _new_param(params, seed):
    return torch.nn.Parameter(torch.randn(4, 2, generator=torch.Generator().manual_seed(seed)))


def _replace_state(params, opt):
    state = opt.state[params[0]]
    key = next(k for k in state if k != "step")
    state[key] = torch.rand(state[key].shape, generator=torch.Generator().manual_seed(7), dtype=state[key].dtype)


def _delete_state(params, opt):
    del opt.state[params[2]]


def _reset_state(params, opt):
    opt.state = defaultdict(dict)


def _drop_grad(params, opt):
    params[1].grad = None


def _append_param(params, opt):
    params.append(_new_param(params, 3))
    opt.param_groups[0]["params"].append(params[-1])


def _swap_param(params, opt):
    opt.state.pop(params[0], None)  # state_dict() needs every state entry's parameter in a group
    params[0] = _new_param(params, 4)  # a parameter of another shape, at the same place
    opt.param_groups[0]["params"][0] = params[0]


def _reload(params, opt):
    opt.load_state_dict(opt.state_dict())


def _new_group(params, opt):
    params.append(_new_param(params, 5))
    opt.add_param_group({"params": [params[-1]]})


class _StateMapping(collections.abc.MutableMapping):
    """optimizer.state as a mapping that is not a dict (plans read dicts: this one is walked)."""

    def __init__(self, items):
        self._d = defaultdict(dict, items)

    def __getitem__(self, key):
        return self._d[key]

    def __setitem__(self, key, value):
        self._d[key] = value

    def __delitem__(self, key):
        del self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


def _state_mapping(params, opt):
    opt.state = _StateMapping(opt.state)


EDITS = {"replace a state tensor": _replace_state, "delete a parameter's state": _delete_state,
         "reset the state": _reset_state, "drop a gradient": _drop_grad, "append a parameter": _append_param,
         "swap a parameter": _swap_param, "reload the state_dict": _reload, "add a param group": _new_group,
         "a state mapping that is not a dict": _state_mapping}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_edits_between_steps_are_seen(name, edit):
    a, b, opt_a, opt_b = pair(OPTIMIZERS[name].torch_cls, OPTIMIZERS[name].pyeff_cls, make_params(torch.float32),
                              OPTIMIZERS[name].kwargs)
    for step in range(6):
        set_grads(step, a, b)
        if step == 3:
            EDITS[edit](a, opt_a)
            EDITS[edit](b, opt_b)
            set_grads(step, a, b)  # gradients for a new parameter
            if edit == "drop a gradient":
                a[1].grad = b[1].grad = None
        opt_a.step()
        opt_b.step()
        assert_optimizers_match(a, b, opt_a, opt_b, torch.float32)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_plan_is_reused_while_nothing_changes(name, monkeypatch):
    params = [torch.nn.Parameter(p) for p in make_params(torch.float32)]
    opt = OPTIMIZERS[name].pyeff(params)
    walks = []
    walk = opt._init_group
    monkeypatch.setattr(opt, "_init_group", lambda *args: walks.append(1) or walk(*args))
    for step in range(5):
        set_grads(step, params)  # new gradient tensors every step, as after zero_grad()
        opt.step()
    # SGD walks twice: its first step's momentum buffers join the state after the step
    assert len(walks) == (2 if name == "sgd" else 1)
    opt.param_groups[0]["lr"] = 0.5  # read by the kernel at every step: no walk
    set_grads(9, params)
    opt.step()
    assert len(walks) == (2 if name == "sgd" else 1)
    for key in ("master_weights", "differentiable"):  # a setting that decides the state: walked again
        before = len(walks)
        opt.param_groups[0][key] = not opt.param_groups[0][key]
        opt.step()
        opt.param_groups[0][key] = not opt.param_groups[0][key]
        assert len(walks) > before, key


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bad_gradient_after_reused_steps_raises_before_writing(name):
    params, opt = _stepped(name)
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    def shape(p):  # .data may give the same gradient tensor another shape
        p.grad.data = torch.randn(2, 2)

    def dtype(p):  # torch >= 2.9 lets a gradient's dtype differ when asked to
        p.grad_dtype = None
        p.grad = torch.randn(p.shape, dtype=torch.float64)

    cases = [(shape, RuntimeError, "a gradient of shape")]
    if hasattr(torch.Tensor, "grad_dtype"):
        cases.append((dtype, RuntimeError, "a gradient of dtype"))
    for corrupt, error, regex in cases:
        set_grads(5, params)
        corrupt(params[-1])
        with pytest.raises(error, match=regex):
            opt.step()
        for x, y in zip(params, before):
            assert torch.equal(x, y)
        for k, v in state_before.items():
            assert torch.equal(opt.state[params[0]][k], v), k


def test_a_state_entry_added_between_steps_is_read():
    # The walk reads absent keys too (state.get): an added one must send the step through it, here
    # to the op's error about an absmax beside fp32 moments.
    p = torch.nn.Parameter(torch.randn(5000))
    opt = OPTIMIZERS["adamw"].pyeff([p])
    for step in range(2):
        set_grads(step, [p])
        opt.step()
    opt.state[p]["exp_avg_absmax"] = torch.ones(20)
    with pytest.raises(RuntimeError, match="expected exp_avg_absmaxes to hold 0 tensors"):
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_plan_keeps_no_state_alive(name):
    # Clearing the state between steps (to give its memory back) must free it, as with torch.optim.
    params, opt = _stepped(name)
    refs = [weakref.ref(t) for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    assert refs
    opt.state.clear()
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_replaced_state_tensor_goes_through_the_walk():
    # The walk converts what it finds (here bf16 moments beside fp32 master weights, torch's layout,
    # back to fp32); a step must not skip that because the lists could be built without it.
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    opt = pyeff.optim.AdamW([p], master_weights=True)
    for step in range(2):
        set_grads(step, [p])
        opt.step()
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].to(torch.bfloat16)
    set_grads(2, [p])
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_lists_with_tensors_of_their_own_are_not_kept():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    group = {"params": [p]}
    state = {p: {"step": torch.zeros(())}}
    kept = {"params": [p], "grads": [p.grad], "steps": [state[p]["step"]], "flags": [True]}
    assert StepPlan.of(state, group, (), kept, False) is not None
    made_here = {**kept, "buffers": [torch.zeros(3)]}  # as SGD's first momentum buffers
    assert StepPlan.of(state, group, (), made_here, False) is None
