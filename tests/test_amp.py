"""The fused mixed-precision step: loss-scale unscaling and overflow skip inside the update,
pyeff.amp.GradScaler, fused clipping (max_grad_norm), fp32 master weights, compensated summation;
every test runs for each optimizer of OPTIMIZERS (tests/_optimizers.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _optimizers import OPTIMIZERS

import pyeff

SCALERS = {"torch": torch.amp.GradScaler, "pyeff": pyeff.amp.GradScaler}


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 17),
                               torch.nn.Tanh(), torch.nn.Linear(17, 3)).to(dtype)


def _batches(n, seed=1, dtype=torch.float32):
    """Inputs and the targets of a fixed random teacher: a task the model can learn."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(13, 3, generator=g) / 13**0.5
    xs = [torch.randn(9, 13, generator=g) for _ in range(n)]
    return [(x.to(dtype), torch.sin(x @ teacher).to(dtype)) for x in xs]


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def _inject(params, where, value):
    t = {"first": 0, "middle": len(params) // 2, "last": len(params) - 1}[where]
    g = params[t].grad.view(-1)
    g[{"first": 0, "middle": g.numel() // 2, "last": g.numel() - 1}[where]] = value


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def _assert_bitwise_equal(snap_a, snap_b):
    (pa, sa), (pb, sb) = snap_a, snap_b
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key in sa[k]:
            assert torch.equal(sa[k][key], sb[k][key]), (k, key)


# ---------------------------------------------------------------- overflow skip


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("scaler_name", list(SCALERS))
@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_overflow_skips_the_step_bitwise_and_backs_off(name, scaler_name, where, value, master):
    optim = OPTIMIZERS[name]
    dtype = torch.bfloat16 if master else torch.float32
    model = _model(dtype)
    opt = optim.pyeff(model.parameters(), master_weights=master, max_grad_norm=5.0)
    scaler = SCALERS[scaler_name]("cpu", init_scale=2.0**12, growth_interval=1)
    # torch's composition on an identical fp32 copy, for the scale sequence
    ref_model = _model(torch.float32)
    ref_opt = optim.torch(ref_model.parameters())
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    for i, (x, y) in enumerate(_batches(4)):
        for m, o, s, ps in ((model, opt, scaler, params), (ref_model, ref_opt, ref_scaler, ref_params)):
            o.zero_grad()
            s.scale(_loss(m, x.to(ps[0].dtype), y)).backward()
            if i == 3:
                _inject(ps, where, value)
        if i == 3:
            before = _snapshot(model, opt)
            grads_before = [p.grad.clone() for p in params]
        for o, s in ((opt, scaler), (ref_opt, ref_scaler)):
            s.step(o)
            s.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert bool(opt.last_step_skipped) == (i == 3)
    _assert_bitwise_equal(before, _snapshot(model, opt))
    for p, g in zip(params, grads_before):  # gradients are never written, not even unscaled
        assert torch.equal(p.grad, g, ) or (torch.isnan(p.grad) == torch.isnan(g)).all()
    assert scaler.get_scale() == 2.0**12 * 2**3 * 0.5  # grew three times, backed off once


@pytest.mark.parametrize("scaler_name", list(SCALERS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_overflow_at_the_first_step_then_training_as_torch(name, scaler_name):
    # torch's GradScaler skips a non-fused torch optimizer's whole first step, so its lazy state
    # (SGD's momentum buffers: first step buf = grad) starts at the next one; pyeff's must too.
    optim = OPTIMIZERS[name]
    model, ref_model = _model(), _model()
    opt, ref_opt = optim.pyeff(model.parameters()), optim.torch(ref_model.parameters())
    scaler = SCALERS[scaler_name]("cpu", init_scale=2.0**10)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i, (x, y) in enumerate(_batches(4)):
        for m, o, s in ((model, opt, scaler), (ref_model, ref_opt, ref_scaler)):
            o.zero_grad()
            s.scale(_loss(m, x, y)).backward()
            if i == 0:
                next(m.parameters()).grad.view(-1)[0] = float("inf")
            s.step(o)
            s.update()
        if i == 0:
            assert bool(opt.last_step_skipped)
            if name == "sgd":  # no momentum buffer yet, and no empty state either
                assert opt.state_dict()["state"] == ref_opt.state_dict()["state"] == {}
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for pa, pb in zip(ref_model.parameters(), model.parameters()):
        for key in optim.state_keys:
            if key in ref_opt.state[pa]:
                torch.testing.assert_close(opt.state[pb][key], ref_opt.state[pa][key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scale_sequence_equals_torch_over_200_steps_with_random_overflows(name):
    optim = OPTIMIZERS[name]
    model, ref_model = _model(), _model()
    opt = optim.pyeff(model.parameters(), lr=1e-3)
    ref_opt = optim.torch(ref_model.parameters(), lr=1e-3)
    scaler = pyeff.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=4)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=4)
    gen = torch.Generator().manual_seed(7)
    skipped = 0
    for x, y in _batches(200, seed=3):
        overflow = torch.rand((), generator=gen).item() < 0.15
        skipped += overflow
        for m, o, s in ((model, opt, scaler), (ref_model, ref_opt, ref_scaler)):
            o.zero_grad()
            s.scale(_loss(m, x, y)).backward()
            if overflow:
                ps = list(m.parameters())
                ps[len(ps) // 2].grad.view(-1)[0] = float("inf")
            s.step(o)
            s.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert scaler._get_growth_tracker() == ref_scaler._get_growth_tracker()
    assert 10 < skipped < 60
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_scaler_state_dict_matches_torch_and_loads_both_ways():
    a, b = pyeff.amp.GradScaler("cpu", init_scale=512.0, growth_factor=3.0), torch.amp.GradScaler("cpu", 512.0, 3.0)
    assert a.state_dict() == b.state_dict()
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())
    assert a.get_scale() == 512.0 and a.get_growth_factor() == 3.0 and a.is_enabled()


def test_scaler_with_a_torch_optimizer_behaves_like_torch():
    results = []
    for cls in (torch.amp.GradScaler, pyeff.amp.GradScaler):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = cls("cpu", init_scale=2.0**8)
        for i, (x, y) in enumerate(_batches(5)):
            opt.zero_grad()
            scaler.scale(_loss(model, x, y)).backward()
            if i == 2:
                next(model.parameters()).grad.view(-1)[0] = float("nan")
            scaler.step(opt)
            scaler.update()
        results.append(([p.detach() for p in model.parameters()], scaler.get_scale()))
    (pa, sa), (pb, sb) = results
    assert sa == sb
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_explicit_unscale_then_step_works_like_torch(name):
    # A user who unscales by hand (e.g. to inspect gradients) gets torch's behaviour.
    optim = OPTIMIZERS[name]
    model, ref_model = _model(), _model()
    opt, ref_opt = optim.pyeff(model.parameters()), optim.torch(ref_model.parameters())
    scaler, ref_scaler = pyeff.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for x, y in _batches(3):
        for m, o, s in ((model, opt, scaler), (ref_model, ref_opt, ref_scaler)):
            o.zero_grad()
            s.scale(_loss(m, x, y)).backward()
            s.unscale_(o)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            s.step(o)
            s.update()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_differentiable_refuses_loss_scaling(name):
    p = torch.nn.Parameter(torch.randn(4))
    opt = OPTIMIZERS[name].pyeff_cls([p], differentiable=True)
    p.grad = torch.randn(4)
    opt.grad_scale = torch.tensor(2.0)
    with pytest.raises(RuntimeError, match="`differentiable=True` does not support loss scaling"):
        opt.step()


# ---------------------------------------------------------------- fused clipping


@pytest.mark.parametrize("scaler_name", [None, "torch", "pyeff"])
@pytest.mark.parametrize("max_norm", [0.05, 1e3], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_max_grad_norm_equals_clip_grad_norm_then_step(name, scaler_name, max_norm):
    optim = OPTIMIZERS[name]
    model, ref_model = _model(), _model()
    opt = optim.pyeff(model.parameters(), max_grad_norm=max_norm)
    ref_opt = optim.torch(ref_model.parameters())
    scaler = SCALERS[scaler_name]("cpu", init_scale=2.0**9) if scaler_name else None
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**9) if scaler_name else None
    for x, y in _batches(6):
        opt.zero_grad()
        ref_opt.zero_grad()
        loss, ref_loss = _loss(model, x, y), _loss(ref_model, x, y)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            ref_scaler.scale(ref_loss).backward()
            ref_scaler.unscale_(ref_opt)
            norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm)
            ref_scaler.step(ref_opt)
            ref_scaler.update()
        else:
            loss.backward()
            opt.step()
            ref_loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm)
            ref_opt.step()
        torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-5, atol=0)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nonfinite_gradient_with_clipping_and_no_scaler_skips(name):
    p = torch.nn.Parameter(torch.randn(10))
    opt = OPTIMIZERS[name].pyeff([p], max_grad_norm=1.0)
    p.grad = torch.randn(10)
    opt.step()
    before = p.detach().clone()
    state = copy.deepcopy(opt.state_dict()["state"])
    p.grad[4] = float("nan")
    opt.step()
    assert torch.equal(p, before) and bool(opt.last_step_skipped)
    after = opt.state_dict()["state"]
    assert after.keys() == state.keys()
    for k in state:
        assert after[k].keys() == state[k].keys()
        for key in state[k]:
            assert torch.equal(after[k][key], state[k][key]), key
    if "step" in state[0]:
        assert opt.state[p]["step"].item() == 1


# ---------------------------------------------------------------- low-precision parameters


def _synthetic_run(name, dtype, steps, start=torch.bfloat16, **kwargs):
    """Params updated with a fixed stream of gradients and the optimizer's small learning rate,
    no weight decay; returns the fp32 view of the result. Every run starts from the same values,
    representable in `start`."""
    optim = OPTIMIZERS[name]
    torch.manual_seed(11)
    init = [(torch.randn(1000) * 3).to(start), torch.randn(37, 5).to(start)]
    ps = [torch.nn.Parameter(t.to(dtype)) for t in init]
    opt = optim.pyeff(ps, lr=optim.small_lr, weight_decay=0.0, **kwargs)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    master = [opt.state[p]["master_param"] for p in ps] if kwargs.get("master_weights") else None
    return [p.detach().float() for p in ps], master, opt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_master_weights_track_fp32_and_parameters_are_master_rounded(name, dtype):
    ref, _, _ = _synthetic_run(name, torch.float32, 300, start=dtype)
    plain, _, _ = _synthetic_run(name, dtype, 300, start=dtype)
    low, master, opt = _synthetic_run(name, dtype, 300, start=dtype, master_weights=True)
    for r, pl, m, p in zip(ref, plain, master, low):
        err_master = (m - r).abs().max().item()
        err_plain = (pl - r).abs().max().item()
        assert err_master < 2e-3 < err_plain  # the fp32 master keeps the small updates plain bf16 loses
        assert torch.equal(m.to(dtype).float(), p)  # parameter == master rounded to nearest even
    for state in opt.state.values():
        assert state["master_param"].dtype == torch.float32
        for key in OPTIMIZERS[name].state_keys:
            assert key not in state or state[key].dtype == torch.float32


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_kahan_summation_keeps_small_updates(name):
    ref, _, _ = _synthetic_run(name, torch.float32, 300)
    plain, _, _ = _synthetic_run(name, torch.bfloat16, 300)
    kahan, _, opt = _synthetic_run(name, torch.bfloat16, 300, kahan_summation=True)
    for r, pl, k, p in zip(ref, plain, kahan, opt.state):
        # parameter + carried error tracks fp32; the parameter is its bf16 rounding
        carried = k + opt.state[p]["compensation"].float()
        assert (carried - r).abs().max() < 0.1 * (pl - r).abs().max()
        assert (k - r).abs().mean() < (pl - r).abs().mean()
    for state in opt.state.values():
        assert state["compensation"].dtype == torch.bfloat16
        for key in OPTIMIZERS[name].state_keys:
            assert key not in state or state[key].dtype == torch.bfloat16


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bf16_model_with_master_weights_tracks_fp32_training(name):
    optim = OPTIMIZERS[name]
    losses = {}
    for run, dtype, kwargs in (("fp32", torch.float32, {}), ("bf16-master", torch.bfloat16,
                                                            dict(master_weights=True))):
        model = _model(dtype)
        opt = optim.pyeff_cls(model.parameters(), **optim.train, max_grad_norm=1.0, **kwargs)
        curve = []
        for x, y in _batches(60, seed=4):
            opt.zero_grad()
            loss = _loss(model, x.to(dtype), y)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[run] = torch.tensor(curve)
        if kwargs:
            for p in model.parameters():
                assert torch.equal(opt.state[p]["master_param"].to(torch.bfloat16), p)
    assert losses["fp32"][-10:].mean() < 0.8 * losses["fp32"][:5].mean()  # it learns
    torch.testing.assert_close(losses["bf16-master"], losses["fp32"], rtol=0.05, atol=0.02)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_mixed_precision_checkpoint_continues_bitwise(name):
    optim = OPTIMIZERS[name]

    def make():
        model = _model(torch.bfloat16)
        opt = optim.pyeff(model.parameters(), master_weights=True, max_grad_norm=0.5)
        return model, opt, pyeff.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)

    def train(model, opt, scaler, batches):
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            scaler.scale(_loss(model, x.to(torch.bfloat16), y)).backward()
            if i == 1:
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()

    batches = _batches(10, seed=9)
    model, opt, scaler = make()
    train(model, opt, scaler, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model2, opt2, scaler2 = make()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    scaler2.load_state_dict(ckpt["scaler"])
    for p in model2.parameters():
        assert opt2.state[p]["master_param"].dtype == torch.float32
        for key in optim.state_keys:
            assert key not in opt2.state[p] or opt2.state[p][key].dtype == torch.float32
        assert optim.state_keys[0] in opt2.state[p]
    train(model, opt, scaler, batches[5:])
    train(model2, opt2, scaler2, batches[5:])
    _assert_bitwise_equal(_snapshot(model, opt), _snapshot(model2, opt2))
    assert scaler.get_scale() == scaler2.get_scale()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fp16_parameters_with_fp16_gradients_and_both_scalers(name):
    for cls in SCALERS.values():
        model = _model(torch.float16)
        opt = OPTIMIZERS[name].pyeff(model.parameters(), lr=1e-3, master_weights=True)
        scaler = cls("cpu", init_scale=2.0**8)
        for x, y in _batches(3):
            opt.zero_grad()
            scaler.scale(_loss(model, x.half(), y)).backward()
            scaler.step(opt)
            scaler.update()
        assert not bool(opt.last_step_skipped)
        for p in model.parameters():
            assert torch.equal(opt.state[p]["master_param"].half(), p)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_low_precision_parameters_with_fp32_gradients(name):
    if not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype")
    optim = OPTIMIZERS[name]
    p = torch.nn.Parameter(torch.randn(333).bfloat16())
    p.grad_dtype = torch.float32
    ref = torch.nn.Parameter(p.detach().float())
    opt = optim.pyeff([p], master_weights=True)
    ref_opt = optim.pyeff([ref])
    for _ in range(3):
        g = torch.randn(333)
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(opt.state[p]["master_param"], ref, rtol=1e-6, atol=1e-7)
