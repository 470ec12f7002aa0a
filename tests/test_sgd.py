"""pyeff.optim.SGD and the sgd_step op.

- op level: every backend against the reference on random inputs (all dtypes and low-precision
  modes, momentum buffers taking their first step beside older ones, sizes that are no multiple of
  any vector width) with poisoned outputs, a hypothesis property test, and a table of bad inputs
  that must raise before anything is written;
- optimizer level: torch's errors, SGD's state (momentum buffers created at a parameter's first
  step, none without momentum), momentum turned on later, parameter groups added later. What
  every optimizer shares with its torch twin is tested in test_optimizers.py (optim_db parity and
  error inputs, checkpoints both ways, bad steps), the mixed-precision step in test_amp.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from _optimizers import assert_optimizers_match, make_params, pair, set_grads, train

import pyeff
from pyeff.ops import OPS
from pyeff.ops.sgd import SGD, sgd_step

BACKENDS = [b for b in OPS["sgd_step"].backends() if b != "reference" and
            pyeff.ops.backend_usable(b, torch.device("cpu")) is None]
# Sizes that are no multiple of any vector width or block (16/32/64 elements), and past the grain.
SIZES = (1, 3, 31, 33, 100, 1000, 40_001)
# Backend vs reference: the same operations in the same order; 1 ulp of the stored dtype.
OP_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-13, atol=1e-15),
          torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=1e-5)}
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


def test_lower_isa_variants_agree(same_bits_on_every_isa):
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
    same_bits_on_every_isa(code)


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


# ------------------------------------------------------------------------------------- optimizer

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


def _pair(params, torch_kwargs):
    return pair(torch.optim.SGD, pyeff.optim.SGD, params, torch_kwargs)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_is_created_like_torch(momentum):
    # No state before the first step; then a momentum_buffer per parameter with a gradient, equal
    # to its first (decayed) gradient; without momentum no state at all.
    a, b, opt_a, opt_b = _pair(make_params(torch.float32), dict(lr=0.1, momentum=momentum, weight_decay=0.1))
    assert opt_a.state_dict()["state"] == opt_b.state_dict()["state"] == {}
    set_grads(0, a, b)
    a[1].grad = b[1].grad = None
    before = [p.detach().clone() for p in b]
    opt_a.step()
    opt_b.step()
    assert_optimizers_match(a, b, opt_a, opt_b, torch.float32)
    assert set(opt_b.state_dict()["state"]) == ({0, 2, 3, 4} if momentum else set())
    if momentum:
        for i in (0, 2, 3, 4):
            assert torch.equal(opt_b.state[b[i]]["momentum_buffer"], b[i].grad + 0.1 * before[i])
            assert opt_b.state[b[i]]["momentum_buffer"].stride() == b[i].stride()


def test_momentum_turned_on_after_a_checkpoint_without_it():
    # A checkpoint trained without momentum has no buffers: the first step with momentum creates
    # them from the gradient, as torch does.
    params = make_params(torch.float32)
    a, b, opt_a, opt_b = _pair(params, dict(lr=0.1))
    train(a, opt_a, 2, seed=0)
    train(b, opt_b, 2, seed=0)
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["momentum"] = 0.9
    train(a, opt_a, 3, seed=10)
    train(b, opt_b, 3, seed=10)
    assert_optimizers_match(a, b, opt_a, opt_b, torch.float32)


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
    assert_optimizers_match(list(model_t.parameters()), list(model_p.parameters()), ot, op, torch.float32)
