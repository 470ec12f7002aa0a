"""The Triton optimizer kernels (kernels/adam.py, adagrad.py, sgd.py, grad_stats.py) through Triton's
interpreter on CPU tensors: against the CPU kernels (the same operations in the same order: the same
bits, but for fp64, whose bias corrections are powers computed another way) and the references,
then the public optimizers end to end with backend="triton". Small chunks (many programs per tensor)
and misaligned views (the unaligned variant) are included."""

from __future__ import annotations

import copy

import pytest
import torch

import pyeff
from _optim_cases import (ADAGRAD_HP, ADAM_COMBOS, ADAM_HP, CHUNK, SGD_HP, SIZES, adagrad_inputs, adam_inputs,
                          assert_equal, clone, grads_of_every_dtype, sgd_inputs)
from pyeff.ops import adagrad_step, adam_step, grad_stats, sgd_step, step_control

pytestmark = pytest.mark.skipif(pyeff.ops.backend_usable("triton", torch.device("cpu")) is not None,
                                reason=str(pyeff.ops.backend_usable("triton", torch.device("cpu"))))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    from pyeff.kernels import _tables

    monkeypatch.setattr(_tables, "CHUNK", CHUNK)
    monkeypatch.setattr(_tables, "BLOCK", 128)


def _close_or_equal(got, want, dtype):
    if dtype == torch.float64:  # pow by squaring vs std::pow: a few ulp of the double coefficients
        for key in want:
            for a, b in zip(got[key], want[key]):
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    else:
        assert_equal(got, want, "triton vs cpu")


@pytest.mark.parametrize("dtype,grad_dtype,mode", ADAM_COMBOS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("hp", ADAM_HP, ids=["adamw-amsgrad", "adam-maximize"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_adam_matches_the_cpu_kernel(dtype, grad_dtype, mode, hp, offset):
    inputs = adam_inputs(SIZES[:14], dtype, grad_dtype, mode, hp["amsgrad"], offset)
    got, cpu = clone(inputs), clone(inputs)
    if mode == "master":  # the parameter is an output only: poison it
        for p in got["params"]:
            p.fill_(float("nan"))
    adam_step(**got, **hp, grad_mult=torch.tensor(0.37), backend="triton")
    adam_step(**cpu, **hp, grad_mult=torch.tensor(0.37), backend="cpu")
    _close_or_equal(got, cpu, dtype)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_adam_reads_a_tensor_lr(lr_dtype):
    inputs = adam_inputs(SIZES[:6], torch.float32, torch.float32, "plain", True)
    got, want = clone(inputs), clone(inputs)
    lr = torch.tensor(0.02, dtype=lr_dtype)
    adam_step(**got, **{**ADAM_HP[0], "lr": lr}, backend="triton")
    adam_step(**want, **{**ADAM_HP[0], "lr": lr}, backend="cpu")
    assert_equal(got, want, "tensor lr")


@pytest.mark.parametrize("dtype,grad_dtype,mode", ADAM_COMBOS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("hp", SGD_HP, ids=["dampening-maximize", "nesterov", "plain"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_sgd_matches_the_cpu_kernel(dtype, grad_dtype, mode, hp, offset):
    inputs = sgd_inputs(SIZES[:14], dtype, grad_dtype, mode, hp["momentum"], offset)
    got, cpu = clone(inputs), clone(inputs)
    if mode == "master":  # the parameter is an output only: poison it
        for p in got["params"]:
            p.fill_(float("nan"))
    sgd_step(**got, **hp, grad_mult=torch.tensor(0.37), backend="triton")
    sgd_step(**cpu, **hp, grad_mult=torch.tensor(0.37), backend="cpu")
    for b in got["momentum_buffers"]:  # first-step buffers were NaN: written
        assert not b.isnan().any()
    assert_equal(got, cpu, "triton vs cpu")


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_sgd_reads_a_tensor_lr(lr_dtype):
    inputs = sgd_inputs(SIZES[:6], torch.float32, torch.float32, "plain", True)
    got, want = clone(inputs), clone(inputs)
    lr = torch.tensor(0.02, dtype=lr_dtype)
    sgd_step(**got, **{**SGD_HP[1], "lr": lr}, backend="triton")
    sgd_step(**want, **{**SGD_HP[1], "lr": lr}, backend="cpu")
    assert_equal(got, want, "tensor lr")


def test_sgd_rejects_bad_input_before_writing():
    inputs = sgd_inputs([5, 9], torch.float32, torch.float32, "plain", True)
    inputs["momentum_buffers"][1] = inputs["momentum_buffers"][1].double()
    snap = clone(inputs)
    with pytest.raises(RuntimeError, match=r"expected momentum_buffers\[1\] to be Float, got Double"):
        sgd_step(**inputs, **SGD_HP[0], backend="triton")
    assert_equal(inputs, snap, "bad input")


@pytest.mark.parametrize("op", ["adam", "adagrad", "sgd"])
def test_found_inf_leaves_everything_bitwise(op):
    if op == "adam":
        inputs = adam_inputs(SIZES[:8], torch.bfloat16, torch.bfloat16, "kahan", True)
        got = clone(inputs)
        adam_step(**got, **ADAM_HP[0], grad_mult=torch.tensor(0.5), found_inf=torch.tensor([1.0]), backend="triton")
    elif op == "sgd":
        inputs = sgd_inputs(SIZES[:8], torch.bfloat16, torch.float32, "master", True)
        got = clone(inputs)
        sgd_step(**got, **SGD_HP[0], grad_mult=torch.tensor(0.5), found_inf=torch.tensor([1.0]), backend="triton")
    else:
        inputs = adagrad_inputs(torch.bfloat16, "master", sparse_rows=[30])
        got = clone(inputs)
        adagrad_step(**got, **ADAGRAD_HP, found_inf=torch.tensor([1.0]), backend="triton")
    assert_equal(got, inputs, "skipped step")


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "plain"), (torch.float64, "plain"), (torch.bfloat16, "plain"),
                                        (torch.bfloat16, "master"), (torch.float16, "kahan")],
                         ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("sparse", [0, 3], ids=["dense", "dense+sparse"])
def test_adagrad_matches_the_cpu_kernel(dtype, mode, sparse):
    inputs = adagrad_inputs(dtype, mode, sparse_rows=[30, 25, 9][:sparse])
    hp = dict(ADAGRAD_HP, weight_decay=0.0 if sparse else 0.1)
    got, cpu = clone(inputs), clone(inputs)
    adagrad_step(**got, **hp, grad_mult=torch.tensor(0.25), backend="triton")
    adagrad_step(**cpu, **hp, grad_mult=torch.tensor(0.25), backend="cpu")
    assert_equal(got, cpu, "triton vs cpu")


def test_grad_stats_matches_the_reference_and_is_deterministic():
    grads = grads_of_every_dtype()
    want = grad_stats(grads, backend="reference")
    got = grad_stats(grads, out=torch.full((2,), float("nan")), backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch.equal(got, grad_stats(grads, backend="triton"))


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [(0, 0), (5, CHUNK - 1), (7, 3 * CHUNK + 6), (22, 76)])
def test_grad_stats_finds_a_nonfinite_element_anywhere(value, where):
    grads = grads_of_every_dtype()
    t, i = where
    grads[t][i] = value
    assert grad_stats(grads, backend="triton")[1].item() == 1.0


@pytest.mark.parametrize("stats,scale,found,max_norm", [
    ([30.0, 0.0], [1024.0], None, 1.0), ([0.25, 0.0], None, None, 5.0), ([4.0, 1.0], [2.0], None, 0.0),
    (None, [65536.0], [0.0], 0.0), (None, None, [1.0], 0.0), ([float("inf"), 1.0], [8.0], [0.0], 2.0)])
def test_step_control_matches_the_reference(stats, scale, found, max_norm):
    def t(x):
        return None if x is None else torch.tensor(x)

    got = step_control(t(stats), t(scale), t(found), max_norm, torch.full((4,), float("nan")), backend="triton")
    want = step_control(t(stats), t(scale), t(found), max_norm, torch.full((4,), float("nan")), backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- the optimizers, end to end


def _model(dtype, sparse=False):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 3)]
    if sparse:
        layers.insert(0, torch.nn.EmbeddingBag(50, 13, mode="sum", sparse=True))
    return torch.nn.Sequential(*layers).to(dtype)


def _train(model, opt, scaler, steps, dtype, inject_at=None, sparse=False):
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        opt.zero_grad()
        x = torch.randint(0, 50, (9, 4), generator=g) if sparse else torch.randn(9, 13, generator=g).to(dtype)
        loss = model(x).float().square().mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if i == inject_at:
            next(p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse).grad.view(-1)[3] = \
                float("nan")
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


CASES = {
    "adamw-fp32-clip": (pyeff.optim.AdamW, torch.float32, dict(max_grad_norm=0.5, amsgrad=True), None),
    "adam-bf16-master-torch-scaler": (pyeff.optim.Adam, torch.bfloat16, dict(master_weights=True),
                                      torch.amp.GradScaler),
    "adamw-fp16-kahan-pyeff-scaler": (pyeff.optim.AdamW, torch.float16, dict(kahan_summation=True, max_grad_norm=1.0),
                                      pyeff.amp.GradScaler),
    "adagrad-fp32-pyeff-scaler-clip": (pyeff.optim.Adagrad, torch.float32, dict(max_grad_norm=0.3),
                                       pyeff.amp.GradScaler),
    "adagrad-sparse-bf16-master": (pyeff.optim.Adagrad, torch.bfloat16, dict(master_weights=True), None),
    "sgd-nesterov-fp32-clip": (pyeff.optim.SGD, torch.float32, dict(momentum=0.9, nesterov=True, max_grad_norm=0.5),
                               None),
    "sgd-bf16-master-torch-scaler": (pyeff.optim.SGD, torch.bfloat16, dict(momentum=0.9, dampening=0.1,
                                                                          master_weights=True), torch.amp.GradScaler),
    "sgd-fp16-kahan-pyeff-scaler": (pyeff.optim.SGD, torch.float16, dict(momentum=0.8, weight_decay=0.01,
                                                                         kahan_summation=True), pyeff.amp.GradScaler),
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimizers_with_the_triton_backend_match_the_cpu_backend(case):
    cls, dtype, kwargs, scaler_cls = CASES[case]
    sparse = "sparse" in case
    runs = {}
    for backend in ("cpu", "triton"):
        model = _model(dtype, sparse)
        opt = cls(model.parameters(), lr=1e-2, backend=backend, **kwargs)
        scaler = scaler_cls("cpu", init_scale=2.0**10, growth_interval=2) if scaler_cls else None
        _train(model, opt, scaler, 5, dtype, inject_at=2 if scaler else None, sparse=sparse)
        runs[backend] = (model, opt)
        if scaler and "step" in next(iter(opt.state.values())):  # the injected NaN was skipped: one step less
            step = next(iter(opt.state.values()))["step"].item()
            assert step == 4, step
    (m_cpu, o_cpu), (m_tri, o_tri) = runs["cpu"], runs["triton"]
    for a, b in zip(m_cpu.parameters(), m_tri.parameters()):
        assert torch.equal(a, b)
    assert_equal({"state": [t for s in o_tri.state.values() for t in s.values()]},
                 {"state": [t for s in o_cpu.state.values() for t in s.values()]}, "optimizer state")


def test_a_step_with_a_nonfinite_gradient_is_skipped_bitwise():
    model = _model(torch.float32)
    opt = pyeff.optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, backend="triton")
    _train(model, opt, None, 2, torch.float32)
    before = copy.deepcopy((list(model.parameters()), opt.state_dict()))
    _train(model, opt, None, 1, torch.float32, inject_at=0)
    assert bool(opt.last_step_skipped)
    for a, b in zip(model.parameters(), before[0]):
        assert torch.equal(a, b)
    assert_equal({"s": [t for s in opt.state_dict()["state"].values() for t in s.values()]},
                 {"s": [t for s in before[1]["state"].values() for t in s.values()]}, "state after a skipped step")
