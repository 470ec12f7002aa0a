"""Compressed optimizer state (NOTE [compressed optimizer state], NOTE [random bits], NOTE [state
formats]): the codec's error bounds and special values, the random bits, the optimizer ops with bf16
and int8 moments and stochastic rounding against their reference, and the optimizers: state bytes,
checkpoints, the torch.optim export, the mixed-precision step, and training tracking fp32 state."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyeff
from _optim_cases import adagrad_inputs, adam_inputs, clone
from pyeff.ops import adagrad_step, adam_step, dequantize_state, quantize_state
from pyeff.ops import state_codec as codec

CPU = ["reference"] + (["cpu"] if pyeff.ops.OPS["quantize_state"].has("cpu") else [])
OP_BACKENDS = [b for b in pyeff.ops.OPS["adam_step"].backends()
               if b != "reference" and pyeff.ops.backend_usable(b, torch.device("cpu")) is None]
ROOT = Path(__file__).resolve().parent.parent


def _heavy_tailed(n, decades=8):
    """Magnitudes spread log-uniformly over `decades` decades, random signs."""
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    return sign * 10.0 ** (-decades * torch.rand(n))


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.int8 else t.view(torch.int16) if t.dtype == torch.bfloat16 else t


# ---------------------------------------------------------------- the codec: bounds and special values


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("data", ["normal", "heavy-tailed", "tiny"])
@pytest.mark.parametrize("signed", [True, False], ids=["int8", "uint8"])
def test_round_trip_error_is_within_the_stated_bounds(backend, data, signed):
    n = 256 * 9 + 77  # a short last block
    x = {"normal": torch.randn(n), "heavy-tailed": _heavy_tailed(n),
         "tiny": torch.randn(n) * 1e-30}[data]
    x = x if signed else x.abs()
    codes, absmax = quantize_state(x, "int8" if signed else "uint8", backend=backend)
    y = dequantize_state(codes, absmax, backend=backend)
    blocks = torch.nn.functional.pad(x.abs(), (0, -n % 256)).view(-1, 256).amax(dim=1).clamp(min=2.0**-126)
    assert torch.equal(absmax, blocks)
    scale = absmax.repeat_interleave(256)[:n]
    floor = scale * (2.0**-18 if signed else 2.0**-34)
    bound = torch.maximum(x.abs() * 2.0**-4, floor) * (1 + 2.0**-20)  # + the fp32 roundings of x / absmax and back
    assert ((y - x).abs() <= bound).all(), ((y - x).abs() / bound).max()
    # each block's largest element is decoded exactly, and (unsigned) no positive value becomes 0
    for b in range(0, n, 256):
        k = x[b:b + 256].abs().argmax()
        assert y[b + k] == x[b + k]
    if not signed:
        assert (y[x > 0] > 0).all()


@pytest.mark.parametrize("backend", CPU)
def test_special_values(backend):
    x = torch.randn(600)
    x[:8] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-40, 3e38])
    codes, absmax = quantize_state(x, "int8", backend=backend)
    y = dequantize_state(codes, absmax, backend=backend)
    assert y[0] == 0 and y[1] == 0 and codes.view(torch.uint8)[1] == 0  # -0 is code 0, not the NaN code
    assert y[2:5].isnan().all()  # non-finite values are stored as NaN, left out of the block's absmax
    assert absmax[0] == 3e38 and y[7] == 3e38
    assert torch.isfinite(y[8:]).all() and torch.isfinite(y[5:7]).all()
    torch.testing.assert_close(y[256:], x[256:], rtol=2.0**-4, atol=0)  # other blocks as usual
    u = torch.rand(300)
    u[:4] = torch.tensor([-1.0, -0.0, 1e-45, float("nan")])
    codes, absmax = quantize_state(u, "uint8", backend=backend)
    y = dequantize_state(codes, absmax, backend=backend)
    assert y[0].isnan() and y[1] == 0 and y[2] > 0 and y[3].isnan()  # a negative "second moment" is NaN
    zeros, absmax = quantize_state(torch.zeros(300), "uint8", backend=backend)
    assert (zeros == 0).all() and (absmax == 2.0**-126).all()
    assert (dequantize_state(zeros, absmax, backend=backend) == 0).all()


def test_bf16_round_to_nearest_is_torch_s():
    x = torch.cat([torch.randn(5000) * 10.0 ** torch.randint(-40, 38, (5000,)).float(), torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3.3895e38])])
    for backend in CPU:
        got, _ = quantize_state(x, "bfloat16", backend=backend)
        assert torch.equal(_bits(got), _bits(x.bfloat16()))


@pytest.mark.parametrize("code", ["bfloat16", "int8", "uint8"])
def test_stochastic_rounding_is_unbiased(code):
    # one value between two stored neighbours, rounded with 64 x 255 random draws: every draw gives
    # a neighbour, and their mean is the value
    value, lo, hi = (1 + 2.0**-9 + 2.0**-11, 1.0, 1 + 2.0**-7) if code == "bfloat16" else (0.3, 0.28125, 0.3125)
    x = torch.full((64, 256), value)
    x[:, 0] = 1.0  # each block's absmax
    q, a = quantize_state(x.view(-1), code, seed=11, step=3, slot=1)
    y = dequantize_state(q, a if code != "bfloat16" else None).view(64, 256)[:, 1:]
    assert ((y == lo) | (y == hi)).all()
    assert abs(y.mean().item() - value) < 0.02 * (hi - lo), (y.mean().item(), value)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 2000), code=st.sampled_from(["int8", "uint8", "bfloat16"]), seed=st.one_of(
    st.none(), st.integers(-2**63, 2**63 - 1)), step=st.integers(0, 2**40), slot=st.integers(0, 3),
    decades=st.integers(0, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_property_quantize_backends_match_the_reference(n, code, seed, step, slot, decades, dtype):
    x = (_heavy_tailed(n, decades) * 1e3).to(dtype)
    if code == "uint8":
        x = x.abs()
    ref = quantize_state(x, code, seed=seed, step=step, slot=slot, backend="reference")
    for backend in CPU[1:]:
        got = quantize_state(x, code, seed=seed, step=step, slot=slot, backend=backend)
        assert torch.equal(_bits(got[0]), _bits(ref[0])) and torch.equal(got[1], ref[1])
        assert torch.equal(dequantize_state(*got, backend=backend).nan_to_num(7.0),
                           dequantize_state(*ref, backend="reference").nan_to_num(7.0))


@pytest.mark.parametrize("backend", CPU)
def test_quantize_refuses_bad_input(backend):
    with pytest.raises(RuntimeError, match="unknown code `int4`"):
        quantize_state(torch.randn(5), "int4", backend=backend)
    with pytest.raises(RuntimeError, match="expected a float32, bfloat16 or float16 tensor, got"):
        quantize_state(torch.randn(5).double(), "int8", backend=backend)
    with pytest.raises(RuntimeError, match="expected `x` to be dense"):
        quantize_state(torch.randn(10)[::2], "int8", backend=backend)
    with pytest.raises(RuntimeError, match="expected `absmax` to be a float32 vector of 2 blocks for 300 codes"):
        dequantize_state(torch.zeros(300, dtype=torch.int8), torch.ones(1), backend=backend)


def test_codes_follow_the_memory_order_of_a_transposed_tensor():
    x = torch.randn(300, 40).t()  # dense, not contiguous
    for backend in CPU:
        codes, absmax = quantize_state(x, "int8", backend=backend)
        assert codes.stride() == x.stride()
        flat, flat_absmax = quantize_state(x.t().contiguous().view(-1), "int8", backend=backend)
        assert torch.equal(codes.t().contiguous().view(-1), flat) and torch.equal(absmax, flat_absmax)


# ---------------------------------------------------------------- random bits


def test_random_bits_are_the_reference_s_and_differ_by_seed_step_and_slot():
    step = torch.tensor(5.0)
    bits = {(seed, st, slot): codec.slot_bits(seed, step + st, slot, 5000)
            for seed in (0, 1, -7) for st in (0, 1) for slot in range(4)}
    for key, b in bits.items():
        assert 0 <= b.min() and b.max() < 2**16
        assert abs(b.float().mean().item() / 2**16 - 0.5) < 0.02  # uniform-ish
        for other, c in bits.items():
            if other != key:
                assert (b == c).float().mean() < 0.01
    # the kernels draw these very bits: 1 + 2^-9 (its fp32 bits below bf16's: 0x4000) is rounded up
    # to bf16 exactly where its 16 random bits + 0x4000 carry
    x = torch.full((5000,), 1 + 2.0**-9)
    for backend in CPU:
        q, _ = quantize_state(x, "bfloat16", seed=-7, step=6, slot=3, backend=backend)
        assert torch.equal(q.float() > 1.0, bits[(-7, 1, 3)] + 0x4000 >= 0x10000)


def test_stochastic_rounding_is_the_same_on_every_thread_count(tmp_path):
    code = """
import sys, torch, pyeff
torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
sizes = [70001, 300, 4097]
ps = [torch.randn(n).bfloat16() for n in sizes]
opt = pyeff.optim.AdamW([torch.nn.Parameter(p) for p in ps], lr=1e-3, state_dtype="int8", stochastic_rounding=True,
                        seed=123)
for _ in range(3):
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape).bfloat16()
    opt.step()
torch.save([p.detach() for p in opt.param_groups[0]["params"]] + [v for s in opt.state.values() for v in s.values()],
           sys.argv[1])
"""
    outs = []
    for threads in (1, 2):
        path = tmp_path / f"{threads}.pt"
        subprocess.run([sys.executable, "-c", code, path, str(threads)], check=True)
        outs.append(torch.load(path))
    for a, b in zip(*outs):
        assert torch.equal(_bits(a), _bits(b))



def test_lower_isa_variants_agree(same_bits_on_every_isa):
    # The codec's AVX-512 and AVX2 loops and the scalar one give the same bits, for every state
    # format, with and without stochastic rounding, through the optimizers' whole step.
    code = """
import sys, torch, pyeff
torch.manual_seed(0)
out = []
for cls, kw in ((pyeff.optim.AdamW, dict(amsgrad=True)), (pyeff.optim.Adagrad, {})):
    for state, sr in (("int8", False), ("int8", True), (torch.bfloat16, True)):
        ps = [torch.nn.Parameter(torch.randn(n)) for n in (5003, 4096, 300)]
        ps.append(torch.nn.Parameter(torch.randn(70, 90, dtype=torch.bfloat16)))
        opt = cls(ps, state_dtype=state, stochastic_rounding=sr, seed=3, **kw)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        out += [p.detach() for p in ps] + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
torch.save(out, sys.argv[1])
"""
    same_bits_on_every_isa(code)

# ---------------------------------------------------------------- the ops: backends vs reference

STATES = [("int8", False), ("int8", True), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True)]
ADAM_HP = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
               decoupled_weight_decay=True)
SIZES = [4097, 300, 1, 256, 70_001, 513]


def _decoded(x, moments):
    """The lists' moments in fp32 (codes dequantized)."""
    out = {}
    for name in moments:
        ts = x[name]
        if ts and ts[0].dtype in (torch.int8, torch.uint8):
            out[name] = [dequantize_state(t, a) for t, a in zip(ts, x[name[:-1] + "_absmaxes"])]
        else:
            out[name] = [t.float() for t in ts]
    return out


def _assert_close_to_reference(got, ref, moments, dtype, state):
    # the backends do the reference's operations in another order (torch's lerp, addcmul): a moment
    # may round to the next code, or the next bf16 value
    rtol = {"int8": 0.13, torch.bfloat16: 0.016, torch.float32: 1e-5}[state]
    dg, dr = _decoded(got, moments), _decoded(ref, moments)
    for name in moments:
        for a, b in zip(dg[name], dr[name]):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6 if state != "int8" else 1e-3 * b.abs().max().item())
    for a, b in zip(got["params"], ref["params"]):
        tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=5e-4)
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype,mode", [(torch.float32, "plain"), (torch.bfloat16, "plain"), (torch.bfloat16, "master"),
                                        (torch.float16, "kahan")], ids=["fp32", "bf16", "bf16-master", "fp16-kahan"])
@pytest.mark.parametrize("state,sr", STATES, ids=[f"{s}{'-sr' if r else ''}".replace("torch.", "") for s, r in STATES])
def test_adam_backends_match_the_reference(backend, dtype, mode, state, sr):
    sizes = SIZES if backend == "cpu" else SIZES[:4]
    x = adam_inputs(sizes, dtype, dtype, mode, True, state=state, sr=sr)
    got, ref = clone(x), clone(x)
    if mode == "master":  # the parameter is an output only: poison it
        for p in got["params"]:
            p.fill_(float("nan"))
    adam_step(**got, **ADAM_HP, grad_mult=torch.tensor(0.37), backend=backend)
    adam_step(**ref, **ADAM_HP, grad_mult=torch.tensor(0.37), backend="reference")
    _assert_close_to_reference(got, ref, ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), dtype, state)
    assert [s.item() for s in got["state_steps"]] == [s.item() + 1 for s in x["state_steps"]]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("state,sr", STATES, ids=[f"{s}{'-sr' if r else ''}".replace("torch.", "") for s, r in STATES])
def test_adagrad_backends_match_the_reference(backend, state, sr):
    x = adagrad_inputs(torch.bfloat16, "plain", state=state, sr=sr)  # 12 tensors of up to 7 blocks
    got, ref = clone(x), clone(x)
    hp = dict(lr=0.05, lr_decay=0.3, weight_decay=0.1, eps=1e-6, maximize=True)
    adagrad_step(**got, **hp, backend=backend)
    adagrad_step(**ref, **hp, backend="reference")
    _assert_close_to_reference(got, ref, ("state_sums",), torch.bfloat16, state)


@pytest.mark.parametrize("backend", ["reference", *OP_BACKENDS])
def test_sparse_adagrad_with_bf16_sums_rounded_stochastically(backend):
    x = adagrad_inputs(torch.bfloat16, "plain", sparse_rows=[30, 25], state=torch.bfloat16, sr=True)
    got, cpu = clone(x), clone(x)
    hp = dict(lr=0.05, lr_decay=0.0, weight_decay=0.0, eps=1e-6, maximize=False)
    adagrad_step(**got, **hp, backend=backend)
    adagrad_step(**cpu, **hp, backend="cpu")
    for a, b in zip(got["state_sums"] + got["params"], cpu["state_sums"] + cpu["params"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["reference", *OP_BACKENDS])
@pytest.mark.parametrize("state,sr", [("int8", True), (torch.bfloat16, True)])
def test_found_inf_leaves_compressed_state_bitwise(backend, state, sr):
    x = adam_inputs(SIZES[:4], torch.bfloat16, torch.bfloat16, "plain", True, state=state, sr=sr)
    got = clone(x)
    adam_step(**got, **ADAM_HP, grad_mult=torch.tensor(0.5), found_inf=torch.tensor(1.0), backend=backend)
    for key in x:
        for a, b in zip(got[key], x[key]):
            assert a is b or torch.equal(_bits(a), _bits(b)) if isinstance(a, torch.Tensor) else a == b, key
    y = adagrad_inputs(torch.bfloat16, "plain", state=state, sr=sr)
    got = clone(y)
    adagrad_step(**got, lr=0.1, found_inf=torch.tensor(1.0), backend=backend)
    for key in y:
        for a, b in zip(got[key], y[key]):
            assert torch.equal(_bits(a), _bits(b)) if isinstance(a, torch.Tensor) else a == b, key


def _coded_inputs():
    return adam_inputs([300, 4097], torch.float32, torch.float32, "plain", True, state="int8")


BAD = [
    ("absmax missing", lambda x: x.update(exp_avg_sq_absmaxes=x["exp_avg_sq_absmaxes"][:1]),
     "expected exp_avg_sq_absmaxes to hold 2 tensors"),
    ("absmax length", lambda x: x["exp_avg_absmaxes"].__setitem__(1, torch.ones(3)),
     r"expected exp_avg_absmaxes\[1\] to be a contiguous float32 vector of 17 block scales"),
    ("absmax dtype", lambda x: x["max_exp_avg_sq_absmaxes"].__setitem__(0, torch.ones(2).double()),
     r"expected max_exp_avg_sq_absmaxes\[0\] to be a contiguous float32 vector"),
    ("signedness", lambda x: x["exp_avg_sqs"].__setitem__(1, x["exp_avg_sqs"][1].view(torch.int8)),
     r"expected exp_avg_sqs\[1\] to be Byte, got Char"),
    ("codes with fp32", lambda x: x["exp_avg_sqs"].__setitem__(0, torch.rand(300)), r"expected exp_avg_sqs\[0\] to be Byte"),
    ("seeds", lambda x: x.update(rng_seeds=[1]), "expected rng_seeds to hold 2 seeds"),
    ("fp64 state", lambda x: x.update(exp_avgs=[t.double() for t in x["exp_avgs"]], exp_avg_absmaxes=[],
                                      exp_avg_sq_absmaxes=[], max_exp_avg_sq_absmaxes=[]),
     r"expected exp_avgs\[0\] to be Float, BFloat16, int8 block codes, got Double"),
]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("what,mutate,match", BAD, ids=[b[0] for b in BAD])
def test_bad_compressed_state_raises_before_anything_is_written(backend, what, mutate, match):
    x = _coded_inputs()
    mutate(x)
    snap = clone(x)
    with pytest.raises(RuntimeError, match=match):
        pyeff.ops.ADAM.overload(backend)(*[x[k] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs",
                                                           "max_exp_avg_sqs", "state_steps", "master_params",
                                                           "compensations", "exp_avg_absmaxes", "exp_avg_sq_absmaxes",
                                                           "max_exp_avg_sq_absmaxes", "rng_seeds")],
                                         0.01, 0.9, 0.99, 1e-8, 0.0, True, False, False)
    for key in x:
        for a, b in zip(x[key], snap[key]):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("backend", [b for b in ["cpu"] if b in OP_BACKENDS])
def test_op_refuses_sparse_gradients_with_codes_and_fp16_with_stochastic_rounding(backend):
    x = adagrad_inputs(torch.float32, "plain", sparse_rows=[20], state="int8")
    with pytest.raises(RuntimeError, match=r"grads\[12\] is sparse; int8 block codes of `state_sums` take dense"):
        adagrad_step(**x, lr=0.1, backend=backend)
    y = adam_inputs([5], torch.float16, torch.float16, "plain", False, sr=True)
    with pytest.raises(RuntimeError, match="stochastic rounding .rng_seeds. rounds bfloat16 values"):
        adam_step(**y, **dict(ADAM_HP, amsgrad=False), backend=backend)


# ---------------------------------------------------------------- the optimizers

def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 80), torch.nn.Tanh(),
                               torch.nn.Linear(80, 3)).to(dtype)


def _train(model, opt, steps, seed=1, scaler=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g).to(next(model.parameters()).dtype)
        loss = model(x).float().square().mean()
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return loss.item()


def _state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
               if torch.is_tensor(t) and k != "step")


@pytest.mark.parametrize("cls", [pyeff.optim.Adam, pyeff.optim.AdamW, pyeff.optim.Adagrad])
def test_state_formats_and_bytes_per_parameter(cls):
    model = _model()
    sizes = {p: p.numel() for p in model.parameters()}  # 6144, 96, 7680, 80, 240, 3
    bytes_ = {}
    for state_dtype in (None, torch.float32, torch.bfloat16, "int8"):
        opt = cls(model.parameters(), state_dtype=state_dtype)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        for p, n in sizes.items():
            for key, value in opt.state[p].items():
                if key == "step" or key.endswith("_absmax"):
                    continue
                coded = state_dtype == "int8" and n >= 4096
                want = {"exp_avg": torch.int8}.get(key, torch.uint8) if coded else (
                    torch.float32 if state_dtype in (None, "int8") else state_dtype)
                assert value.dtype == want, (state_dtype, key, n)
                assert (key + "_absmax" in opt.state[p]) == coded
        bytes_[state_dtype] = _state_bytes(opt)
    moments = 1 if cls is pyeff.optim.Adagrad else 2
    big, small = 6144 + 7680, 96 + 80 + 240 + 3
    assert bytes_[torch.float32] == bytes_[None] == 4 * moments * (big + small)
    assert bytes_[torch.bfloat16] == 2 * moments * (big + small)
    assert bytes_["int8"] == moments * (big + 4 * (6144 // 256 + 7680 // 256) + 4 * small)


def test_fp64_and_complex_parameters_keep_their_state():
    ps = [torch.nn.Parameter(torch.randn(5000, dtype=torch.float64)), torch.nn.Parameter(torch.randn(5000,
                                                                                                      dtype=torch.cfloat))]
    opt = pyeff.optim.AdamW(ps, state_dtype="int8")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.float64 and opt.state[ps[1]]["exp_avg"].dtype == torch.cfloat


@pytest.mark.parametrize("cls", [pyeff.optim.AdamW, pyeff.optim.Adagrad])
@pytest.mark.parametrize("state_dtype,sr", [("int8", True), ("int8", False), (torch.bfloat16, True)])
def test_checkpoint_round_trip_continues_bitwise(cls, state_dtype, sr):
    model = _model(torch.bfloat16)
    kw = dict(state_dtype=state_dtype, stochastic_rounding=sr, seed=5)
    opt = cls(model.parameters(), **kw)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, seed=2)
    buf.seek(0)
    ck = torch.load(buf)
    model2 = _model(torch.bfloat16, seed=9)
    model2.load_state_dict(ck["model"])
    opt2 = cls(model2.parameters(), **dict(kw, seed=77))  # the checkpoint's seed wins
    opt2.load_state_dict(ck["opt"])
    _train(model2, opt2, 3, seed=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for (ka, sa), (kb, sb) in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].items()):
        for key in sa:
            assert torch.equal(_bits(sa[key]), _bits(sb[key])), key


def test_a_torch_checkpoint_loads_quantized_and_the_export_loads_into_torch():
    model = _model()
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    _train(model, ref, 4)
    ck = copy.deepcopy(ref.state_dict())
    opt = pyeff.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True, state_dtype="int8")
    opt.load_state_dict(ck)
    assert opt.param_groups[0]["state_dtype"] == "int8"  # the optimizer's setting, absent from torch's checkpoint
    p = next(model.parameters())  # 6144 elements: int8
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False), ("max_exp_avg_sq", False)):
        codes, absmax = quantize_state(ck["state"][0][key], "int8" if signed else "uint8")
        assert torch.equal(opt.state[p][key], codes) and torch.equal(opt.state[p][key + "_absmax"], absmax)
    small = list(model.parameters())[1]
    assert torch.equal(opt.state[small]["exp_avg"], ck["state"][1]["exp_avg"])  # under 4096 elements: fp32, as is
    _train(model, opt, 2)
    exported = opt.torch_state_dict()
    assert set(exported["param_groups"][0]) == set(ref.state_dict()["param_groups"][0])
    assert set(exported["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    torch_opt.load_state_dict(exported)
    state = torch_opt.state[p]
    assert state["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(state["exp_avg"], dequantize_state(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_absmax"]))
    # torch continues from the dequantized moments as pyeff with fp32 state does
    twin = pyeff.optim.AdamW(copy.deepcopy(model).parameters(), lr=1e-2, amsgrad=True)
    twin_model = [q for q in twin.param_groups[0]["params"]]
    twin.load_state_dict(copy.deepcopy(exported))  # torch keeps a loaded step tensor as is: not shared
    for q, t in zip(model.parameters(), twin_model):
        q.grad = torch.randn_like(q)
        t.grad = q.grad.clone()
    torch_opt.step()
    twin.step()
    for q, t in zip(model.parameters(), twin_model):
        torch.testing.assert_close(q, t, rtol=2e-5, atol=1e-7)


def test_master_weight_export_leaves_the_master_behind():
    model = _model(torch.bfloat16)
    opt = pyeff.optim.AdamW(model.parameters(), master_weights=True, state_dtype="int8")
    _train(model, opt, 2)
    exported = opt.torch_state_dict()
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in exported["state"].values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in exported["state"].values())
    torch_opt = torch.optim.AdamW(model.parameters())
    torch_opt.load_state_dict(exported)  # torch casts the moments to the bf16 parameters' dtype
    assert torch_opt.state[next(model.parameters())]["exp_avg"].dtype == torch.bfloat16


SCALERS = {"torch": torch.amp.GradScaler, "pyeff": pyeff.amp.GradScaler}


@pytest.mark.parametrize("scaler_name", list(SCALERS))
@pytest.mark.parametrize("master", [False, True], ids=["bf16-sr", "bf16-master"])
def test_overflow_skips_the_step_bitwise_with_compressed_state(scaler_name, master):
    model = _model(torch.bfloat16)
    opt = pyeff.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True, master_weights=master, max_grad_norm=1.0,
                            state_dtype="int8", stochastic_rounding=not master)
    scaler = SCALERS[scaler_name]("cpu", init_scale=2.0**12, growth_interval=1)
    _train(model, opt, 3, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
    scale = scaler.get_scale()
    opt.zero_grad()
    scaler.scale(model(torch.randn(4, 64).bfloat16()).float().sum()).backward()
    next(model.parameters()).grad.view(-1)[17] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert bool(opt.last_step_skipped) and scaler.get_scale() == scale / 2
    for a, b in zip(model.parameters(), before[0]):
        assert torch.equal(a, b)
    for k, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(_bits(value), _bits(before[1][k][key])), key
    _train(model, opt, 1, scaler=scaler)  # and it goes on
    assert not bool(opt.last_step_skipped)


def test_fused_clipping_and_loss_scaling_act_on_compressed_state_as_on_fp32():
    runs = {}
    for state_dtype in (None, torch.bfloat16, "int8"):
        model = _model()
        opt = pyeff.optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.05, state_dtype=state_dtype)
        runs[state_dtype] = (_train(model, opt, 30, scaler=pyeff.amp.GradScaler("cpu")), opt.grad_norm.item())
    base = runs[None]
    for state_dtype in (torch.bfloat16, "int8"):
        assert abs(runs[state_dtype][0] / base[0] - 1) < 0.05, runs
        assert abs(runs[state_dtype][1] / base[1] - 1) < 0.05, runs


def test_stochastic_rounding_reproduces_from_its_seed_and_moves_small_updates():
    outs = []
    for seed in (3, 3, 4):
        model = _model(torch.bfloat16)
        _train(model, pyeff.optim.AdamW(model.parameters(), lr=1e-4, stochastic_rounding=True, seed=seed), 5)
        outs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(outs[0], outs[2]))
    # updates far below half a bf16 ulp: rounding to nearest loses them all, stochastic rounding does not
    p0 = torch.full((10000,), 1.0)
    moved = {}
    for sr in (False, True):
        p = torch.nn.Parameter(p0.clone().bfloat16())
        opt = pyeff.optim.Adagrad([p], lr=1e-4, stochastic_rounding=sr, seed=1)
        for _ in range(50):
            p.grad = torch.ones_like(p)
            opt.step()
        moved[sr] = (1.0 - p.float().mean()).item()
    expected = sum(1e-4 / ((k + 1) ** 0.5) for k in range(50))  # Adagrad's steps with unit gradients
    assert moved[False] == 0.0
    assert abs(moved[True] / expected - 1) < 0.1, (moved, expected)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(state_dtype=torch.float16), ValueError, "Invalid state_dtype: torch.float16"),
    (dict(state_dtype="int4"), ValueError, "Invalid state_dtype: 'int4'"),
    (dict(state_dtype="int8", differentiable=True), RuntimeError, "`differentiable` does not support `state_dtype`"),
], ids=["fp16", "int4", "differentiable"])
def test_bad_state_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pyeff.optim.AdamW(_model().parameters(), **kwargs)


def test_bad_state_settings_raise_at_step_before_anything_is_written():
    model = _model(torch.float16)
    opt = pyeff.optim.AdamW(model.parameters(), stochastic_rounding=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="`stochastic_rounding` rounds bfloat16 values; float16 parameters need"):
        opt.step()
    assert not opt.state
    emb = torch.nn.Embedding(5000, 4, sparse=True)
    ada = pyeff.optim.Adagrad(emb.parameters(), state_dtype="int8")
    emb(torch.tensor([1, 2])).sum().backward()
    before = copy.deepcopy(ada.state_dict())
    with pytest.raises(RuntimeError, match="int8 block codes of 'sum' .* take dense gradients only"):
        ada.step()
    assert torch.equal(ada.state_dict()["state"][0]["sum"], before["state"][0]["sum"])


# ---------------------------------------------------------------- training tracks fp32 state


def _byte_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(256, 32), torch.nn.Flatten(), torch.nn.Linear(8 * 32, 256),
                               torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))


@pytest.fixture(scope="module")
def corpus():
    sys.path.insert(0, str(ROOT / "examples"))
    from lm_data import load_corpus, train_batch, val_batches

    train, val = load_corpus(max_bytes=2_000_000)
    batches = [(x, y[:, -1]) for x, y in (train_batch(train, s, 0, 0, 1, 256, 8) for s in range(1000))]
    return batches, [(x, y[:, -1]) for x, y in val_batches(val, 8, 512, 8)]


def _val_loss(corpus, cls, lr, dtype=torch.float32, **kwargs):
    batches, val = corpus
    model = _byte_model().to(dtype)
    opt = cls(model.parameters(), lr=lr, **kwargs)
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return sum(torch.nn.functional.cross_entropy(model(x).float(), y).item() for x, y in val) / len(val)


@pytest.mark.parametrize("cls,lr", [(pyeff.optim.AdamW, 3e-3), (pyeff.optim.Adagrad, 3e-2)], ids=["adamw", "adagrad"])
def test_an_mlp_on_real_text_trained_with_compressed_state_tracks_fp32_state(corpus, cls, lr):
    # next-byte prediction on the Python standard library's source (examples/lm_data.py), 1000 steps
    base = _val_loss(corpus, cls, lr)
    assert base < 2.1  # it learned something (a uniform guess is ln 256 = 5.5)
    for kwargs in (dict(state_dtype="int8"), dict(state_dtype="int8", stochastic_rounding=True),
                   dict(state_dtype=torch.bfloat16), dict(state_dtype=torch.bfloat16, stochastic_rounding=True)):
        loss = _val_loss(corpus, cls, lr, **kwargs)
        assert abs(loss / base - 1) < 0.02, (kwargs, loss, base)


def test_bf16_parameters_with_stochastic_rounding_track_fp32_master_weights(corpus):
    base = _val_loss(corpus, pyeff.optim.AdamW, 3e-3, torch.bfloat16, master_weights=True)
    for kwargs in (dict(stochastic_rounding=True), dict(stochastic_rounding=True, state_dtype="int8"),
                   dict(master_weights=True, state_dtype="int8")):
        loss = _val_loss(corpus, pyeff.optim.AdamW, 3e-3, torch.bfloat16, **kwargs)
        assert abs(loss / base - 1) < 0.02, (kwargs, loss, base)
