"""bias + GELU and SwiGLU (pyeff/ops/activation.py, pyeff/nn/activation.py): every backend against the
reference, the layers against torch, gradcheck in float64, bad inputs, and one torch.compile of a
small model using every fused layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pyeff
import pyeff.nn.functional as PF
from pyeff.ops import activation as ops
from pyeff.ops import backend_usable

BACKENDS = [b for b in ("cpu", "triton") if backend_usable(b, torch.device("cpu")) is None]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
TORCH_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Rows x features; the CPU ones cross its 2048-column tiles and 32 row blocks.
SHAPES_SMALL = [(1, 1), (3, 7), (5, 33), (17, 100), (4, 257)]
SHAPES_CPU = SHAPES_SMALL + [(70, 2051), (1000, 37), (2, 5000)]


def shapes_for(backend):
    return SHAPES_SMALL if backend == "triton" else SHAPES_CPU


def close(got, want, dtype, scale=1.0):
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def check_bias_gelu(backend, rows, n, dtype, bias_dtype, approximate, with_bias=True, bias_grad=True):
    x = torch.randn(rows, n, dtype=dtype) * 3
    b = torch.randn(n, dtype=bias_dtype) if with_bias else None
    dy = torch.randn(rows, n, dtype=dtype)
    close(ops.bias_gelu_forward(x, b, approximate, backend=backend),
          ops.bias_gelu_forward(x, b, approximate, backend="reference"), dtype)
    bias_grad = bias_grad and with_bias
    got = ops.bias_gelu_backward(dy, x, b, approximate, bias_grad, backend=backend)
    want = ops.bias_gelu_backward(dy, x, b, approximate, bias_grad, backend="reference")
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype, scale=max(1.0, rows**0.5))


def check_swiglu(backend, rows, n, dtype, packed):
    gate = torch.randn(rows, 2 * n if packed else n, dtype=dtype) * 3
    up = None if packed else torch.randn(rows, n, dtype=dtype)
    dy = torch.randn(rows, n, dtype=dtype)
    close(ops.swiglu_forward(gate, up, backend=backend), ops.swiglu_forward(gate, up, backend="reference"), dtype)
    close(ops.swiglu_backward(dy, gate, up, backend=backend), ops.swiglu_backward(dy, gate, up, backend="reference"),
          dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_matches_reference(backend, approximate, dtype, poison):
    for rows, n in shapes_for(backend):
        check_bias_gelu(backend, rows, n, dtype, dtype, approximate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias,bias_grad", [(False, False), (True, False)])
def test_bias_gelu_without_bias_or_its_gradient(backend, with_bias, bias_grad, poison):
    check_bias_gelu(backend, 9, 131, torch.float32, torch.float32, "none", with_bias, bias_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bias_gelu_fp32_bias_with_low_precision_input(backend, dtype, poison):
    check_bias_gelu(backend, 13, 77, dtype, torch.float32, "tanh")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "two_inputs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_matches_reference(backend, packed, dtype, poison):
    for rows, n in shapes_for(backend):
        check_swiglu(backend, rows, n, dtype, packed)


def test_bias_gradient_is_the_same_on_any_thread_count():
    # NOTE [deterministic column sums]
    x, b, dy = torch.randn(300, 2100), torch.randn(2100), torch.randn(300, 2100)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(ops.bias_gelu_backward(dy, x, b, "none", True, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


def test_extreme_inputs_stay_finite():
    x = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]])
    for backend in BACKENDS:
        for approximate in ("none", "tanh"):
            y = ops.bias_gelu_forward(x, None, approximate, backend=backend)
            torch.testing.assert_close(y, F.gelu(x, approximate=approximate))
            dx, _ = ops.bias_gelu_backward(torch.ones_like(x), x, None, approximate, False, backend=backend)
            assert torch.isfinite(dx).all()
        y = ops.swiglu_forward(x, x, backend=backend)
        torch.testing.assert_close(y, F.silu(x) * x)
        assert torch.isfinite(ops.swiglu_backward(torch.ones_like(x), x, x, backend=backend)).all()


# ---------------------------------------------------------------- the layers against torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_matches_torch(dtype, approximate):
    ours = pyeff.nn.LinearGELU(37, 129, approximate=approximate, dtype=dtype)
    theirs = torch.nn.Linear(37, 129, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 11, 37, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 11, 129, dtype=dtype)
    y = ours(x)
    g = torch.autograd.grad(y, [x, ours.weight, ours.bias], dy)
    y_t = F.gelu(theirs(x), approximate=approximate)
    g_t = torch.autograd.grad(y_t, [x, theirs.weight, theirs.bias], dy)
    tol = TORCH_TOL[dtype]
    torch.testing.assert_close(y, y_t, rtol=tol, atol=tol)
    for a, b in zip(g, g_t):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 6)  # bf16 sums over 33 rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gelu_module_and_swiglu_match_torch(dtype):
    x = torch.randn(4, 5, 66, dtype=dtype, requires_grad=True)
    dy = torch.randn(4, 5, 66, dtype=dtype)
    for approximate in ("none", "tanh"):
        y = pyeff.nn.GELU(approximate)(x)
        y_t = F.gelu(x, approximate=approximate)
        tol = TORCH_TOL[dtype]
        torch.testing.assert_close(y, y_t, rtol=tol, atol=tol)
        torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_t, x, dy)[0],
                                   rtol=tol, atol=tol)
    # packed: gate is the first half, up the second
    y = pyeff.nn.SwiGLU()(x)
    a, b = x.chunk(2, dim=-1)
    y_t = F.silu(a) * b
    torch.testing.assert_close(y, y_t, rtol=TORCH_TOL[dtype], atol=TORCH_TOL[dtype])
    torch.testing.assert_close(torch.autograd.grad(y, x, dy[..., :33])[0], torch.autograd.grad(y_t, x, dy[..., :33])[0],
                               rtol=TORCH_TOL[dtype], atol=TORCH_TOL[dtype])
    # two inputs
    gate = torch.randn(4, 5, 33, dtype=dtype, requires_grad=True)
    up = torch.randn(4, 5, 33, dtype=dtype, requires_grad=True)
    y = PF.swiglu(gate, up)
    y_t = F.silu(gate) * up
    torch.testing.assert_close(y, y_t, rtol=TORCH_TOL[dtype], atol=TORCH_TOL[dtype])
    for g, g_t in zip(torch.autograd.grad(y, [gate, up], dy[..., :33]), torch.autograd.grad(y_t, [gate, up], dy[..., :33])):
        torch.testing.assert_close(g, g_t, rtol=TORCH_TOL[dtype], atol=TORCH_TOL[dtype])


def test_non_contiguous_inputs():
    x = torch.randn(30, 4, 5).transpose(0, 2)  # (5, 4, 30), not contiguous
    b = torch.randn(60)[::2]
    torch.testing.assert_close(PF.bias_gelu(x, b), F.gelu(x + b))
    torch.testing.assert_close(PF.swiglu(x), F.silu(x[..., :15]) * x[..., 15:])
    torch.testing.assert_close(PF.swiglu(x, x.flip(-1)), F.silu(x) * x.flip(-1))


def test_linear_gelu_constructor_and_state_dict_are_torch():
    for kwargs in ({}, {"bias": False}, {"dtype": torch.bfloat16}):
        ours, theirs = pyeff.nn.LinearGELU(5, 7, **kwargs), torch.nn.Linear(5, 7, **kwargs)
        assert isinstance(ours, torch.nn.Linear)
        assert {k: (v.shape, v.dtype) for k, v in ours.state_dict().items()} == {
            k: (v.shape, v.dtype) for k, v in theirs.state_dict().items()}
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 5, dtype=ours.weight.dtype)
        torch.testing.assert_close(ours(x), F.gelu(theirs(x)), rtol=TORCH_TOL[x.dtype], atol=TORCH_TOL[x.dtype])
    assert "approximate='tanh'" in repr(pyeff.nn.LinearGELU(2, 3, approximate="tanh"))


def test_bias_gelu_saves_the_input_before_the_bias():
    x = torch.randn(16, 40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        PF.bias_gelu(x, b)
    assert sorted(t.numel() for t in saved) == [40, 16 * 40]


# ---------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("fn", ["bias_gelu", "bias_gelu_tanh", "gelu", "swiglu_packed", "swiglu_two_inputs"])
def test_gradcheck(backend, fn):
    x = torch.randn(3, 2, 10, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 2, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    cases = {
        "bias_gelu": (lambda x, b: PF.bias_gelu(x, b, backend=backend), (x, b)),
        "bias_gelu_tanh": (lambda x, b: PF.bias_gelu(x, b, "tanh", backend=backend), (x, b)),
        "gelu": (lambda x: PF.bias_gelu(x, backend=backend), (x,)),
        "swiglu_packed": (lambda x: PF.swiglu(x, backend=backend), (x,)),
        "swiglu_two_inputs": (lambda x, u: PF.swiglu(x, u, backend=backend), (x, u)),
    }
    f, args = cases[fn]
    assert torch.autograd.gradcheck(f, args)


# ---------------------------------------------------------------- hypothesis


_DTYPES = st.sampled_from(DTYPES)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), n=st.integers(1, 300), dtype=_DTYPES, approximate=st.sampled_from(["none", "tanh"]),
       with_bias=st.booleans(), fp32_bias=st.booleans(), scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_bias_gelu_forward_property(rows, n, dtype, approximate, with_bias, fp32_bias, scale):
    bias_dtype = torch.float32 if fp32_bias and dtype in (torch.bfloat16, torch.float16) else dtype
    x = torch.randn(rows, n, dtype=dtype) * scale
    b = torch.randn(n, dtype=bias_dtype) if with_bias else None
    close(ops.bias_gelu_forward(x, b, approximate, backend="cpu"),
          ops.bias_gelu_forward(x, b, approximate, backend="reference"), dtype)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), n=st.integers(1, 300), dtype=_DTYPES, approximate=st.sampled_from(["none", "tanh"]),
       with_bias=st.booleans(), bias_grad=st.booleans(), scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_bias_gelu_backward_property(rows, n, dtype, approximate, with_bias, bias_grad, scale):
    x = torch.randn(rows, n, dtype=dtype) * scale
    b = torch.randn(n, dtype=dtype) if with_bias else None
    dy = torch.randn(rows, n, dtype=dtype)
    args = (dy, x, b, approximate, bias_grad and with_bias)
    got, want = ops.bias_gelu_backward(*args, backend="cpu"), ops.bias_gelu_backward(*args, backend="reference")
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype, scale=max(1.0, rows**0.5))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), n=st.integers(1, 300), dtype=_DTYPES, packed=st.booleans(),
       scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_swiglu_forward_property(rows, n, dtype, packed, scale):
    gate = torch.randn(rows, 2 * n if packed else n, dtype=dtype) * scale
    up = None if packed else torch.randn(rows, n, dtype=dtype)
    close(ops.swiglu_forward(gate, up, backend="cpu"), ops.swiglu_forward(gate, up, backend="reference"), dtype)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), n=st.integers(1, 300), dtype=_DTYPES, packed=st.booleans(),
       scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_swiglu_backward_property(rows, n, dtype, packed, scale):
    gate = torch.randn(rows, 2 * n if packed else n, dtype=dtype) * scale
    up = None if packed else torch.randn(rows, n, dtype=dtype)
    dy = torch.randn(rows, n, dtype=dtype)
    close(ops.swiglu_backward(dy, gate, up, backend="cpu"), ops.swiglu_backward(dy, gate, up, backend="reference"),
          dtype)


# ---------------------------------------------------------------- bad inputs


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_FUNCTIONAL = [
    (lambda: PF.bias_gelu(_x(3, 4), _x(5)), ValueError, r"Invalid bias shape: \(5,\); expected \(4,\)"),
    (lambda: PF.bias_gelu(_x(3, 4), approximate="fast"), ValueError, r"Invalid approximate: 'fast'"),
    (lambda: PF.bias_gelu(torch.ones(3, 4, dtype=torch.int64)), ValueError, r"Invalid input dtype: torch.int64"),
    (lambda: PF.bias_gelu(_x(3, 4), torch.ones(4, dtype=torch.int64)), ValueError, r"Invalid bias dtype"),
    (lambda: PF.bias_gelu(torch.tensor(1.0), _x(1)), ValueError, r"Invalid input shape: \(\)"),
    (lambda: pyeff.nn.GELU("fast"), ValueError, r"Invalid approximate: 'fast'"),
    (lambda: pyeff.nn.LinearGELU(3, 4, approximate="sigmoid"), ValueError, r"Invalid approximate: 'sigmoid'"),
    (lambda: PF.swiglu(_x(3, 5)), ValueError, r"Invalid gate shape: \(3, 5\); without `up` the last dimension"),
    (lambda: PF.swiglu(_x(3, 4), _x(3, 5)), ValueError, r"Invalid up shape: \(3, 5\); expected gate's shape"),
    (lambda: PF.swiglu(_x(3, 4), _x(3, 4, dtype=torch.float64)), ValueError, r"Invalid up dtype: torch.float64"),
    (lambda: PF.swiglu(torch.tensor(1.0)), ValueError, r"Invalid gate shape: \(\)"),
    (lambda: PF.swiglu(_x(3, 4), backend="nope"), RuntimeError, r"unknown backend `nope`"),
]


@pytest.mark.parametrize("call,exc,pattern", BAD_FUNCTIONAL, ids=range(len(BAD_FUNCTIONAL)))
def test_bad_functional_input_raises(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


BAD_KERNEL = [
    (lambda: torch.ops.pyeff.bias_gelu_forward.cpu(_x(3), None, "none"), r"expected x to be 2-D"),
    (lambda: torch.ops.pyeff.bias_gelu_forward.cpu(_x(3, 4), None, "erf"),
     r"expected `approximate` to be 'none' or 'tanh', got 'erf'"),
    (lambda: torch.ops.pyeff.bias_gelu_forward.cpu(_x(3, 4), _x(4, dtype=torch.float64), "none"),
     r"expected bias to be Float like the input, got Double"),
    (lambda: torch.ops.pyeff.bias_gelu_forward.cpu(_x(4, 3).t(), None, "none"), r"expected x to be contiguous"),
    (lambda: torch.ops.pyeff.bias_gelu_backward.cpu(_x(3, 4), _x(3, 4), None, "none", True),
     r"`bias_grad=True` needs the `bias`"),
    (lambda: torch.ops.pyeff.bias_gelu_backward.cpu(_x(3, 5), _x(3, 4), None, "none", False),
     r"expected dy of shape \[3, 4\]"),
    (lambda: torch.ops.pyeff.swiglu_forward.cpu(_x(3, 5), None), r"expected gate's last dimension to be even"),
    (lambda: torch.ops.pyeff.swiglu_forward.cpu(_x(3, 4), _x(3, 4, dtype=torch.bfloat16)),
     r"expected up to be Float like the input, got BFloat16"),
    (lambda: torch.ops.pyeff.swiglu_backward.cpu(_x(3, 3), _x(3, 4), None), r"expected dy of shape \[3, 2\]"),
    (lambda: torch.ops.pyeff.swiglu_forward.cpu(torch.ones(3, 4, dtype=torch.int32), None),
     r"expected gate to be float32, float64, bfloat16 or float16, got Int"),
]


@pytest.mark.parametrize("call,pattern", BAD_KERNEL, ids=range(len(BAD_KERNEL)))
def test_bad_kernel_input_raises(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call()


# ---------------------------------------------------------------- torch.compile


class _Block(torch.nn.Module):
    """A pre-norm transformer-style block using every fused layer."""

    def __init__(self, d=24):
        super().__init__()
        self.norm1 = pyeff.nn.LayerNorm(d)
        self.fc = pyeff.nn.LinearGELU(d, 2 * d, approximate="tanh")
        self.proj = torch.nn.Linear(2 * d, d)
        self.norm2 = pyeff.nn.RMSNorm(d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.act = pyeff.nn.SwiGLU()
        self.down = torch.nn.Linear(2 * d, d)

    def forward(self, x):
        y, h = self.norm2(self.proj(self.fc(self.norm1(x))), residual=x)
        return h + self.down(self.act(self.up(y)))


def test_model_compiles_with_torch_compile():
    model = _Block()
    x = torch.randn(2, 7, 24, requires_grad=True)

    def step(fn):
        out = fn(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        return [out.detach(), *grads]

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- op registration, GPU


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_custom_ops_pass_opcheck(backend):
    # Schema, fake implementation and tracing of the registered ops (what torch.compile relies on).
    x, u, dy, b = torch.randn(5, 7), torch.randn(5, 7), torch.randn(5, 7), torch.randn(7)
    torch.library.opcheck(ops.BIAS_GELU_FORWARD.overload(backend), (x, b, "tanh"))
    torch.library.opcheck(ops.BIAS_GELU_BACKWARD.overload(backend), (dy, x, b, "none", True))
    torch.library.opcheck(ops.SWIGLU_FORWARD.overload(backend), (torch.randn(5, 14), None))
    torch.library.opcheck(ops.SWIGLU_BACKWARD.overload(backend), (dy, x, u))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_on_gpu(dtype):
    for rows, n in [(4096, 4096), (1000, 4099), (3, 20000), (513, 77)]:
        x = (torch.randn(rows, n, dtype=dtype) * 3).cuda()
        b = torch.randn(n, dtype=dtype).cuda()
        dy = torch.randn(rows, n, dtype=dtype).cuda()
        for approximate in ("none", "tanh"):
            close(ops.bias_gelu_forward(x, b, approximate), ops.bias_gelu_forward(x, b, approximate, backend="reference"),
                  dtype)
            got = ops.bias_gelu_backward(dy, x, b, approximate, True)
            want = ops.bias_gelu_backward(dy, x, b, approximate, True, backend="reference")
            close(got[0], want[0], dtype)
            close(got[1], want[1], dtype, scale=rows**0.5)
        packed = torch.cat([x, dy], dim=1)
        close(ops.swiglu_forward(packed, None), ops.swiglu_forward(packed, None, backend="reference"), dtype)
        close(ops.swiglu_backward(dy, x, dy), ops.swiglu_backward(dy, x, dy, backend="reference"), dtype)
    # the layers, end to end
    m = pyeff.nn.LinearGELU(64, 96, approximate="tanh").cuda()
    x = torch.randn(8, 17, 64, device="cuda", requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, F.gelu(F.linear(x, m.weight, m.bias), approximate="tanh"), rtol=1e-5, atol=1e-5)
    torch.autograd.grad(y.sum(), [x, m.weight, m.bias])
