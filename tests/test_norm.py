"""LayerNorm / RMSNorm (pyeff/ops/norm.py, pyeff/nn/norm.py): every backend against the reference,
the modules against torch.nn, gradcheck in float64, and bad inputs."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyeff
import pyeff.nn.functional as PF
from pyeff.ops import backend_usable
from pyeff.ops import norm as ops

BACKENDS = [b for b in ("cpu", "triton") if backend_usable(b, torch.device("cpu")) is None]
# Same math, one rounding per output: one ulp of the output dtype, plus fp32 summation order.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# Against torch's own implementations (its bf16 RMSNorm rounds before the weight multiply).
TORCH_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
# Rows x columns, none a multiple of a vector width; the interpreter gets the small ones.
SHAPES_SMALL = [(1, 1), (3, 7), (5, 33), (17, 100), (4, 257)]
SHAPES_CPU = SHAPES_SMALL + [(70, 2051), (1000, 37), (3, 5000)]


def shapes_for(backend):
    return SHAPES_SMALL if backend == "triton" else SHAPES_CPU


def close(got, want, dtype, what=""):
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype], msg=lambda m: f"{what}: {m}")


def make_case(rows, n, dtype, param_dtype, rms, residual, weight, bias):
    x = torch.randn(rows, n, dtype=dtype) * 2 + 0.5
    r = torch.randn(rows, n, dtype=dtype) if residual else None
    w = torch.randn(n, dtype=param_dtype) if weight else None
    b = torch.randn(n, dtype=param_dtype) if bias and not rms else None
    return x, r, w, b


def run_both(backend, rows, n, dtype, param_dtype, rms, residual, weight, bias, dh, eps=1e-5):
    x, r, w, b = make_case(rows, n, dtype, param_dtype, rms, residual, weight, bias)
    want = ops.norm_forward(x, r, w, b, eps, rms, backend="reference")
    got = ops.norm_forward(x, r, w, b, eps, rms, backend=backend)
    for name, g, e in zip(["y", "h", "mean", "rstd"], got, want):
        close(g, e, dtype, name)
    h = want[1] if residual else x
    dy = torch.randn(rows, n, dtype=dtype)
    dhv = torch.randn(rows, n, dtype=dtype) if dh else None
    args = (dy, dhv, h, w, want[2], want[3], rms, w is not None, b is not None)
    want_b = ops.norm_backward(*args, backend="reference")
    got_b = ops.norm_backward(*args, backend=backend)
    for name, g, e in zip(["dx", "dweight", "dbias"], got_b, want_b):
        # Weight/bias gradients sum over rows: allow the summation order's error on that scale.
        scale = 1.0 if name == "dx" else max(1.0, rows**0.5)
        torch.testing.assert_close(g, e, rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_backend_matches_reference(backend, rms, dtype, poison):
    for rows, n in shapes_for(backend):
        run_both(backend, rows, n, dtype, dtype, rms, residual=False, weight=True, bias=True, dh=False)
        run_both(backend, rows, n, dtype, dtype, rms, residual=True, weight=True, bias=True, dh=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("residual,weight,bias,dh", [(False, False, False, False), (True, False, False, False),
                                                     (True, True, False, False), (False, False, True, False)])
def test_backend_optional_pieces(backend, rms, residual, weight, bias, dh, poison):
    run_both(backend, 9, 131, torch.float32, torch.float32, rms, residual, weight, bias, dh)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_parameters_with_low_precision_input(backend, dtype, poison):
    for rms in (False, True):
        run_both(backend, 13, 77, dtype, torch.float32, rms, residual=True, weight=True, bias=True, dh=True)


def test_weight_gradient_is_the_same_on_any_thread_count():
    # NOTE [deterministic column sums]: fixed row blocks, partials added in block order.
    x, r, w, b = make_case(300, 515, torch.float32, torch.float32, False, True, True, True)
    _, h, mean, rstd = ops.norm_forward(x, r, w, b, 1e-5, False, backend="cpu")
    dy = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(ops.norm_backward(dy, None, h, w, mean, rstd, False, True, True, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


# ---------------------------------------------------------------- the modules against torch.nn


def _torch_twin(module):
    if isinstance(module, pyeff.nn.LayerNorm):
        twin = torch.nn.LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                                  bias=module.bias is not None, dtype=module.weight.dtype if module.weight is not None else None)
    else:
        twin = torch.nn.RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                                dtype=module.weight.dtype if module.weight is not None else None)
    twin.load_state_dict(module.state_dict())
    return twin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,shape,normalized", [
    ("layer", (3, 5, 129), (129,)), ("layer", (2, 7, 9), (7, 9)), ("rms", (4, 3, 255), (255,)),
    ("rms", (2, 5, 3, 11), (3, 11)), ("layer", (1000, 31), (31,)), ("rms", (1000, 31), (31,))])
def test_module_matches_torch(dtype, kind, shape, normalized):
    cls = pyeff.nn.LayerNorm if kind == "layer" else pyeff.nn.RMSNorm
    ours = cls(normalized, dtype=dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p))
    theirs = _torch_twin(ours)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, dtype=dtype)
    y_ours = ours(x)
    (gx_ours, *gp_ours) = torch.autograd.grad(y_ours, [x, *ours.parameters()], dy)
    y_theirs = theirs(x)
    (gx_theirs, *gp_theirs) = torch.autograd.grad(y_theirs, [x, *theirs.parameters()], dy)
    tol = TORCH_TOL[dtype]
    torch.testing.assert_close(y_ours, y_theirs, rtol=tol, atol=tol)
    torch.testing.assert_close(gx_ours, gx_theirs, rtol=tol, atol=tol)
    if dtype == torch.bfloat16:
        # torch sums bf16 weight/bias gradients less accurately than fp32 accumulation does (errors of
        # several bf16 ulps over 1000 rows): compare with the float64 result instead.
        truth = _torch_twin(ours).double()
        x64 = x.detach().double().requires_grad_()
        gp_theirs = [g.to(dtype) for g in torch.autograd.grad(truth(x64), list(truth.parameters()), dy.double())]
    for a, b in zip(gp_ours, gp_theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_residual_variant_matches_unfused_torch(dtype, kind):
    n = 97
    ours = pyeff.nn.LayerNorm(n, dtype=dtype) if kind == "layer" else pyeff.nn.RMSNorm(n, dtype=dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p))
    theirs = _torch_twin(ours)
    x = torch.randn(6, 5, n, dtype=dtype, requires_grad=True)
    r = torch.randn(6, 5, n, dtype=dtype, requires_grad=True)
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    y, h = ours(x, residual=r)
    g_ours = torch.autograd.grad([y, h], [x, r, *ours.parameters()], [dy, dh])
    h_t = x + r
    y_t = theirs(h_t)
    g_theirs = torch.autograd.grad([y_t, h_t], [x, r, *theirs.parameters()], [dy, dh])
    tol = TORCH_TOL[dtype]
    assert torch.equal(h, h_t)  # the sum is rounded to the input's dtype like torch's add
    torch.testing.assert_close(y, y_t, rtol=tol, atol=tol)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 6)


def test_non_contiguous_input_and_parameters():
    x = torch.randn(40, 6, 3).transpose(0, 2)  # (3, 6, 40), not contiguous
    w = torch.randn(80)[::2]
    b = torch.randn(40)
    r = torch.randn(3, 40, 6).transpose(1, 2)
    torch.testing.assert_close(PF.layer_norm(x, (40,), w, b), torch.nn.functional.layer_norm(x, (40,), w, b))
    y, h = PF.add_rms_norm(x, r, (40,), w, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x + r, (40,), w, 1e-5))
    torch.testing.assert_close(h, x + r)


def test_rms_norm_eps_none_is_the_machine_epsilon_of_the_math():
    # torch.nn.RMSNorm's eps=None: the epsilon of the dtype the math runs in (fp32 for bf16/fp16), as
    # torch computes it since 2.7; torch 2.6 took the input dtype's (0.0078 for bf16), which swamps
    # small inputs, so that torch is compared with the explicit value.
    x = torch.randn(4, 16) * 1e-3  # small enough that eps matters
    old_torch = torch.nn.functional.rms_norm(x.bfloat16(), (16,)).abs().max() < 0.1
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        expected = torch.nn.functional.rms_norm(xd, (16,), eps=eps if old_torch else None)
        torch.testing.assert_close(PF.rms_norm(xd, (16,)), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-3}, {"elementwise_affine": False}, {"bias": False},
                                    {"dtype": torch.bfloat16}, {"device": "cpu", "dtype": torch.float64}])
def test_layer_norm_constructor_and_state_dict_are_torch(kwargs):
    ours, theirs = pyeff.nn.LayerNorm((4, 6), **kwargs), torch.nn.LayerNorm((4, 6), **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert (ours.normalized_shape, ours.eps, ours.elementwise_affine) == (
        theirs.normalized_shape, theirs.eps, theirs.elementwise_affine)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for k in sd_ours:
        assert sd_ours[k].shape == sd_theirs[k].shape and sd_ours[k].dtype == sd_theirs[k].dtype
        assert torch.equal(sd_ours[k], sd_theirs[k])  # the same initialization
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert repr(ours).replace("pyeff.nn.", "") == repr(theirs)


@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-6}, {"eps": None}, {"elementwise_affine": False},
                                    {"dtype": torch.float16}])
def test_rms_norm_constructor_and_state_dict_are_torch(kwargs):
    ours, theirs = pyeff.nn.RMSNorm(8, **kwargs), torch.nn.RMSNorm(8, **kwargs)
    assert isinstance(ours, torch.nn.RMSNorm)
    assert (ours.normalized_shape, ours.eps, ours.elementwise_affine) == (
        theirs.normalized_shape, theirs.eps, theirs.elementwise_affine)
    assert {k: (v.shape, v.dtype) for k, v in ours.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())


def test_torch_module_can_be_reclassed_in_place():
    m = torch.nn.LayerNorm(10)
    weight = m.weight
    m.__class__ = pyeff.nn.LayerNorm
    assert m.weight is weight and m.backend is None
    x = torch.randn(3, 10)
    torch.testing.assert_close(m(x), torch.nn.functional.layer_norm(x, (10,), m.weight, m.bias))


def test_saves_only_the_input_and_row_statistics():
    # NOTE [what norms save]: the input (or x + residual), the weight and fp32 mean/rstd per row.
    m = pyeff.nn.LayerNorm(64)
    x = torch.randn(32, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x)
    assert sorted(t.numel() for t in saved) == [32, 32, 64, 32 * 64]


# ---------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "layer_norm_no_affine"])
def test_gradcheck(backend, fn):
    n = 11
    x = torch.randn(3, 4, n, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)
    cases = {
        "layer_norm": (lambda x, w, b: PF.layer_norm(x, (n,), w, b, backend=backend), (x, w, b)),
        "rms_norm": (lambda x, w: PF.rms_norm(x, (n,), w, 1e-5, backend=backend), (x, w)),
        "add_layer_norm": (lambda x, r, w, b: PF.add_layer_norm(x, r, (n,), w, b, backend=backend), (x, r, w, b)),
        "add_rms_norm": (lambda x, r, w: PF.add_rms_norm(x, r, (n,), w, backend=backend), (x, r, w)),
        "layer_norm_no_affine": (lambda x: PF.layer_norm(x, (4, n), backend=backend), (x,)),
    }
    f, args = cases[fn]
    assert torch.autograd.gradcheck(f, args)


# ---------------------------------------------------------------- hypothesis


_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), n=st.integers(1, 300), dtype=_DTYPES, rms=st.booleans(), residual=st.booleans(),
       weight=st.booleans(), bias=st.booleans(), fp32_params=st.booleans(), eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_norm_forward_property(rows, n, dtype, rms, residual, weight, bias, fp32_params, eps):
    param_dtype = torch.float32 if fp32_params and dtype in (torch.bfloat16, torch.float16) else dtype
    x, r, w, b = make_case(rows, n, dtype, param_dtype, rms, residual, weight, bias)
    want = ops.norm_forward(x, r, w, b, eps, rms, backend="reference")
    got = ops.norm_forward(x, r, w, b, eps, rms, backend="cpu")
    for g, e in zip(got, want):
        close(g, e, dtype)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), n=st.integers(1, 300), dtype=_DTYPES, rms=st.booleans(), dh=st.booleans(),
       weight=st.booleans(), bias_grad=st.booleans(), weight_grad=st.booleans())
def test_norm_backward_property(rows, n, dtype, rms, dh, weight, bias_grad, weight_grad):
    x, _, w, _ = make_case(rows, n, dtype, dtype, rms, False, weight, False)
    _, _, mean, rstd = ops.norm_forward(x, None, w, None, 1e-5, rms, backend="reference")
    dy = torch.randn_like(x)
    dhv = torch.randn_like(x) if dh else None
    args = (dy, dhv, x, w, mean, rstd, rms, weight_grad and w is not None, bias_grad and not rms)
    want = ops.norm_backward(*args, backend="reference")
    got = ops.norm_backward(*args, backend="cpu")
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=TOL[dtype], atol=TOL[dtype] * max(1.0, rows**0.5))


# ---------------------------------------------------------------- bad inputs


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_FUNCTIONAL = [
    (lambda: PF.layer_norm(_x(3, 5), (4,)), ValueError, r"Invalid input shape: \(3, 5\); expected \(\*, 4\)"),
    (lambda: PF.layer_norm(_x(5), (2, 5)), ValueError, r"Invalid input shape"),
    (lambda: PF.layer_norm(torch.ones(3, 4, dtype=torch.int64), (4,)), ValueError, r"Invalid input dtype: torch.int64"),
    (lambda: PF.layer_norm(_x(3, 4), (4,), _x(5)), ValueError, r"Invalid weight shape: \(5,\); expected \(4,\)"),
    (lambda: PF.layer_norm(_x(3, 4), (4,), None, _x(4, 1)), ValueError, r"Invalid bias shape"),
    (lambda: PF.layer_norm(_x(3, 4), (4,), eps=-1.0), ValueError, r"Invalid eps: -1.0"),
    (lambda: PF.rms_norm(_x(3, 4), (4,), torch.ones(4, dtype=torch.int32)), ValueError, r"Invalid weight dtype"),
    (lambda: PF.add_layer_norm(_x(3, 4), _x(3, 5), (4,)), ValueError, r"Invalid residual shape: \(3, 5\)"),
    (lambda: PF.add_rms_norm(_x(3, 4), _x(3, 4, dtype=torch.float64), (4,)), ValueError,
     r"Invalid residual dtype: torch.float64; expected input's dtype torch.float32"),
    (lambda: PF.add_rms_norm(_x(3, 4), None, (4,)), ValueError, r"Invalid residual: None"),
    (lambda: PF.layer_norm(_x(3, 4), (4,), backend="cuda"), RuntimeError, r"backend `cuda` cannot run here"),
    (lambda: PF.layer_norm(_x(3, 4), (4,), backend="nope"), RuntimeError, r"unknown backend `nope`"),
]


@pytest.mark.parametrize("call,exc,pattern", BAD_FUNCTIONAL, ids=range(len(BAD_FUNCTIONAL)))
def test_bad_functional_input_raises(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


f32 = torch.float32
BAD_KERNEL = [
    (lambda: torch.ops.pyeff.norm_forward.cpu(_x(3), None, None, None, 1e-5, False), r"expected x to be 2-D"),
    (lambda: torch.ops.pyeff.norm_forward.cpu(_x(3, 4).t(), None, None, None, 1e-5, False),
     r"expected x to be contiguous"),
    (lambda: torch.ops.pyeff.norm_forward.cpu(torch.ones(3, 4, dtype=torch.int32), None, None, None, 1e-5, False),
     r"expected x to be float32, float64, bfloat16 or float16, got Int"),
    (lambda: torch.ops.pyeff.norm_forward.cpu(_x(3, 4), _x(3, 5), None, None, 1e-5, False),
     r"expected residual of shape \[3, 4\]"),
    (lambda: torch.ops.pyeff.norm_forward.cpu(_x(3, 4), None, _x(5), None, 1e-5, False),
     r"expected weight of shape \[4\]"),
    (lambda: torch.ops.pyeff.norm_forward.cpu(_x(3, 4), None, _x(4, dtype=torch.float64), None, 1e-5, False),
     r"expected weight to be Float like the input, got Double"),
    (lambda: torch.ops.pyeff.norm_forward.cpu(_x(3, 4, dtype=torch.bfloat16), None, _x(4), _x(4, dtype=torch.bfloat16),
                                              1e-5, False), r"expected weight and bias of one dtype"),
    (lambda: torch.ops.pyeff.norm_forward.cpu(_x(3, 4), None, None, _x(4), 1e-5, True), r"`rms=True` takes no `bias`"),
    (lambda: torch.ops.pyeff.norm_backward.cpu(_x(3, 4), None, _x(3, 4), None, _x(3), _x(2), False, False, False),
     r"expected rstd to be a contiguous Float CPU tensor of shape \[3\]"),
    (lambda: torch.ops.pyeff.norm_backward.cpu(_x(3, 4), None, _x(3, 4), None, _x(3), _x(3), False, True, False),
     r"`weight_grad=True` needs the `weight`"),
    (lambda: torch.ops.pyeff.norm_backward.cpu(_x(3, 5), None, _x(3, 4), None, _x(3), _x(3), False, False, False),
     r"expected dy of shape \[3, 4\]"),
]


@pytest.mark.parametrize("call,pattern", BAD_KERNEL, ids=range(len(BAD_KERNEL)))
def test_bad_kernel_input_raises(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call()


def test_triton_rejects_rows_longer_than_a_program():
    from pyeff.kernels import norm as triton_norm

    with pytest.raises(RuntimeError, match=re.escape(f"rows of up to {triton_norm.MAX_COLS} elements")):
        triton_norm.norm_forward(_x(1, triton_norm.MAX_COLS + 1), None, None, None, 1e-5, False)


def test_lower_isa_builds_agree(run_with_isa, tmp_path):
    # The DEFAULT and AVX2 builds of the kernels (other vector widths, other summation orders) agree
    # with the best one to rounding.
    code = """
import sys, torch, pyeff
from pyeff.ops import norm, activation
g = torch.Generator().manual_seed(0)
x = torch.randn(37, 203, generator=g); r = torch.randn(37, 203, generator=g); w = torch.randn(203, generator=g)
b = torch.randn(203, generator=g); dy = torch.randn(37, 203, generator=g)
out = []
for rms in (False, True):
    y, h, mean, rstd = norm.norm_forward(x, r, w, None if rms else b, 1e-5, rms, backend="cpu")
    out += [y, h, *norm.norm_backward(dy, dy, h, w, mean, rstd, rms, True, not rms, backend="cpu")]
for a in ("none", "tanh"):
    out += [activation.bias_gelu_forward(x, b, a, backend="cpu"), *activation.bias_gelu_backward(dy, x, b, a, True, backend="cpu")]
out += [activation.swiglu_forward(x, r, backend="cpu"), activation.swiglu_backward(dy, x, r, backend="cpu")]
torch.save(out, sys.argv[1])
"""
    results = {}
    for isa in ("avx512", "default", "avx2"):
        path = tmp_path / f"{isa}.pt"
        run_with_isa(code, isa, path)
        results[isa] = torch.load(path)
    for isa in ("default", "avx2"):
        for a, b in zip(results["avx512"], results[isa]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * 37**0.5)


# ---------------------------------------------------------------- op registration, GPU


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_custom_ops_pass_opcheck(backend):
    # Schema, fake implementation and tracing of the registered ops (what torch.compile relies on).
    x, r, w, b = make_case(5, 7, torch.float32, torch.float32, False, True, True, True)
    y, h, mean, rstd = ops.norm_forward(x, r, w, b, 1e-5, False, backend="reference")
    torch.library.opcheck(ops.NORM_FORWARD.overload(backend), (x, r, w, b, 1e-5, False))
    torch.library.opcheck(ops.NORM_FORWARD.overload(backend), (x, None, w, None, 1e-5, True))
    torch.library.opcheck(ops.NORM_BACKWARD.overload(backend), (torch.randn_like(x), torch.randn_like(x), h, w, mean,
                                                                rstd, False, True, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_triton_on_gpu(dtype, rms):
    for rows, n in [(4096, 1024), (1000, 4099), (3, 20000), (513, 77)]:
        x, r, w, b = make_case(rows, n, dtype, dtype, rms, True, True, True)
        x, r, w = x.cuda(), r.cuda(), w.cuda()
        b = b.cuda() if b is not None else None
        want = ops.norm_forward(x, r, w, b, 1e-5, rms, backend="reference")
        got = ops.norm_forward(x, r, w, b, 1e-5, rms)  # the automatic choice on CUDA: triton
        for g, e in zip(got, want):
            close(g, e, dtype)
        dy, dh = torch.randn_like(x), torch.randn_like(x)
        args = (dy, dh, want[1], w, want[2], want[3], rms, True, not rms)
        for name, g, e in zip(["dx", "dw", "db"], ops.norm_backward(*args), ops.norm_backward(*args, backend="reference")):
            torch.testing.assert_close(g, e, rtol=TOL[dtype], atol=TOL[dtype] * rows**0.5, msg=lambda m: f"{name}: {m}")
    # the modules, end to end
    m = (pyeff.nn.RMSNorm(256) if rms else pyeff.nn.LayerNorm(256)).cuda().to(dtype)
    x = torch.randn(8, 33, 256, device="cuda", dtype=dtype, requires_grad=True)
    y = m(x)
    y_t = _torch_twin(m).cuda()(x)
    torch.testing.assert_close(y, y_t, rtol=TORCH_TOL[dtype], atol=TORCH_TOL[dtype])
