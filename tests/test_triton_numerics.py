"""The Triton layer kernels (kernels/, through the interpreter) on what breaks kernels silently: bf16
rounding of every special value against torch's .to(), NaN and infinities against torch, strided
rows and targets, cross-entropy rows split over programs, the in-place grad_output scaling, and
linear_cross_entropy's vocabulary chunks. Every output buffer is poisoned (NaN) before a kernel runs."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyeff import ops
from pyeff.ops._registry import backend_usable

pytestmark = pytest.mark.skipif(backend_usable("triton", torch.device("cpu")) is not None,
                                reason=f"triton: {backend_usable('triton', torch.device('cpu'))}")

if backend_usable("triton", torch.device("cpu")) is None:
    import triton
    import triton.language as tl

    from pyeff.kernels import activation, norm
    from pyeff.kernels._rounding import cast_rne
    from pyeff.kernels.cross_entropy import cross_entropy_rows, rescale_
    from pyeff.kernels.linear_cross_entropy import linear_cross_entropy as linear_ce_kernel

    @triton.jit
    def _cast_kernel(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, cast_rne(tl.load(X + offs, mask=offs < n), Y.dtype.element_ty), mask=offs < n)

INF, NAN = math.inf, math.nan
LOW = [torch.bfloat16, torch.float16]


def _bits(*words):
    return torch.tensor(list(words), dtype=torch.int64).to(torch.int32).view(torch.float32)


def special_floats():
    """Every kind of fp32 a rounding can get wrong, both signs, and random bit patterns."""
    words = [
        0x00000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x00008000, 0x00018000,  # zero, denormals
        0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # ties to even, either side
        0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,  # the largest bf16, the tie to inf, fp32's largest
        0x7F800000,  # inf
        0x7FC00000, 0x7FFFFFFF, 0x7F800001, 0x7FBFFFFF, 0x7F808000,  # NaNs: quiet, the GPU's, payloads
        0x477FE000, 0x477FF000, 0x33800000, 0x33000000,  # fp16: its largest, the tie to inf, tiny
    ]
    words += [w | 0x80000000 for w in words]
    g = torch.Generator().manual_seed(0)
    return torch.cat([_bits(*words), torch.randint(0, 2**32, (4096,), generator=g).to(torch.int32).view(torch.float32)])


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_rounding_matches_torch_on_every_special_value(dtype):
    x = special_floats()
    y = torch.full(x.shape, NAN, dtype=dtype)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = x.to(dtype)
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan), "a NaN lost, or one made"
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert bool(y[x.isnan()].isnan().all())


def _specials(rows, n, dtype, *, with_inf=True):
    """Random values with NaN, +inf and -inf planted in separate rows; the last rows stay finite."""
    x = torch.randn(rows, n, dtype=torch.float64) * 2
    x[0, n // 2] = NAN
    if with_inf:
        x[1, 0] = INF
        x[2, n - 1] = -INF
    return x.to(dtype)


def _same_nan_and_close(actual, expected, dtype, what):
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    finite = ~expected.isnan()
    assert torch.equal(actual.isinf() & finite, expected.isinf() & finite), f"{what}: infinities differ"
    tol = dict(atol=2e-2, rtol=2e-2) if dtype in LOW else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual[finite].float(), expected[finite].float(), **tol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- NaN and infinities, as torch


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_norms_propagate_nan_and_inf_as_torch(dtype, rms, poison):
    rows, n = 6, 37
    x, dy = _specials(rows, n, dtype), torch.randn(rows, n).to(dtype)
    w, b = torch.randn(n).to(dtype), None if rms else torch.randn(n).to(dtype)
    xt = x.float().requires_grad_()
    ref = F.rms_norm(xt, (n,), w.float(), 1e-5) if rms else F.layer_norm(xt, (n,), w.float(), b.float(), 1e-5)
    ref.backward(dy.float())
    y, _, mean, rstd = norm.norm_forward(x, None, w, b, 1e-5, rms)
    dx, _, _ = norm.norm_backward(dy, None, x, w, mean, rstd, rms, False, False)
    _same_nan_and_close(y, ref.detach().to(dtype), dtype, "y")
    _same_nan_and_close(dx, xt.grad.to(dtype), dtype, "dx")
    assert not y[3:].isnan().any() and not dx[3:].isnan().any()  # other rows untouched


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_propagates_nan_and_inf_as_torch(dtype, approximate, poison):
    x, dy = _specials(4, 33, dtype), torch.randn(4, 33).to(dtype)
    # torch's vectorized CPU GELU turns +inf into NaN; its scalar path (and CUDA's) gives +inf:
    # the reference is torch's formula in float64, one element at a time
    xt = x.double().requires_grad_()
    ref = torch.stack([F.gelu(v, approximate=approximate) for v in xt.reshape(-1)]).reshape(x.shape)
    ref.backward(dy.double())
    y = activation.bias_gelu_forward(x, None, approximate)
    dx, _ = activation.bias_gelu_backward(dy, x, None, approximate, False)
    _same_nan_and_close(y, ref.detach().to(dtype), dtype, "y")
    _same_nan_and_close(dx, xt.grad.to(dtype), dtype, "dx")


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_swiglu_propagates_nan_and_inf_as_torch(dtype, poison):
    gate, up, dy = _specials(4, 33, dtype), _specials(4, 33, dtype).flip(0), torch.randn(4, 33).to(dtype)
    gt, ut = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = torch.stack([F.silu(g) for g in gt.reshape(-1)]).reshape(gate.shape) * ut
    ref.backward(dy.double())
    y = activation.swiglu_forward(gate, up)
    dgrad = activation.swiglu_backward(dy, gate, up)
    _same_nan_and_close(y, ref.detach().to(dtype), dtype, "y")
    _same_nan_and_close(dgrad, torch.cat([gt.grad, ut.grad], 1).to(dtype), dtype, "dgate, dup")


def _cross_entropy(logits, target, *, weight=None, ignore_index=-100, smoothing=0.0, splits=None, mean=True):
    """The kernel's (losses, gradient of the mean / sum) with poisoned outputs."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = target != ignore_index
    w = torch.ones(logits.shape[1], dtype=acc) if weight is None else weight.to(acc)
    scale = 1 / w[torch.where(valid, target, 0).clamp(0, logits.shape[1] - 1)][valid].sum() if mean else None
    rows = torch.full((logits.shape[0],), NAN, dtype=acc)
    grad = torch.full(logits.shape, NAN, dtype=logits.dtype)
    cross_entropy_rows(logits, target, weight, ignore_index, smoothing, scale, rows, grad, splits=splits)
    return rows, grad


@pytest.mark.parametrize("splits", [None, 3], ids=["one-program-per-row", "split-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_cross_entropy_propagates_nan_and_inf_as_torch(dtype, splits):
    x = _specials(6, 300, dtype)
    x[3, 7] = -INF  # a masked-out class that is the target: an infinite loss, a finite gradient
    x[4, 9] = NAN  # an ignored row: loss 0, but torch's gradient there is NaN
    t = torch.randint(0, 300, (6,))
    t[3], t[4] = 7, -100
    xt = x.float().requires_grad_()
    ref = F.cross_entropy(xt, t, reduction="none")
    ref.sum().backward()
    rows, grad = _cross_entropy(x, t, splits=splits, mean=False)
    _same_nan_and_close(rows, ref.detach(), torch.float32, "losses")
    _same_nan_and_close(grad, xt.grad.to(dtype), dtype, "gradient")


def test_cross_entropy_marks_a_target_out_of_range_nan():
    # No host sync may check targets on the GPU: the row's loss and gradient say it instead.
    x, t = torch.randn(4, 50), torch.tensor([3, 50, -1, -100])
    for splits in (None, 2):
        rows, grad = _cross_entropy(x, t, splits=splits, mean=False)
        assert rows[1:3].isnan().all() and grad[1:3].isnan().all()
        assert not rows[[0, 3]].isnan().any() and not grad[[0, 3]].isnan().any()


# ---------------------------------------------------------------- strides


def _strided(t, extra=5):
    """`t`'s values in a row view of a wider buffer (row stride > columns)."""
    wide = torch.full((t.shape[0], t.shape[1] + extra), NAN, dtype=t.dtype)
    wide[:, 2:2 + t.shape[1]] = t
    return wide[:, 2:2 + t.shape[1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_rows_give_the_contiguous_results(dtype, poison):
    rows, n = 5, 33
    x, r, dy = (torch.randn(rows, n).to(dtype) for _ in range(3))
    w = torch.randn(n).to(dtype)
    views = [_strided(x), _strided(r), _strided(dy)]
    columns = [x.t().contiguous().t(), r.t().contiguous().t(), dy.t().contiguous().t()]  # columns not contiguous
    for xs, rs, dys in (views, columns):
        for rms in (False, True):
            expected = norm.norm_forward(x, r, w, None, 1e-5, rms)
            got = norm.norm_forward(xs, rs, w, None, 1e-5, rms)
            assert all(torch.equal(a, e) for a, e in zip(got, expected))
            exp_back = norm.norm_backward(dy, dy, x, w, expected[2], expected[3], rms, True, False)
            got_back = norm.norm_backward(dys, dys, xs, w, expected[2], expected[3], rms, True, False)
            assert all(torch.equal(a, e) for a, e in zip(got_back, exp_back))
        assert torch.equal(activation.bias_gelu_forward(xs, w, "none"), activation.bias_gelu_forward(x, w, "none"))
        for a, e in zip(activation.bias_gelu_backward(dys, xs, w, "tanh", True),
                        activation.bias_gelu_backward(dy, x, w, "tanh", True)):
            assert torch.equal(a, e)
        assert torch.equal(activation.swiglu_forward(xs, rs), activation.swiglu_forward(x, r))
        assert torch.equal(activation.swiglu_backward(dys, xs, rs), activation.swiglu_backward(dy, x, r))


@pytest.mark.parametrize("splits", [None, 2], ids=["one-program-per-row", "split-rows"])
def test_cross_entropy_strided_logits_and_target(splits):
    labels = torch.randint(0, 70, (6, 2))
    labels[1, 0] = -100
    target = labels[:, 0]  # stride 2: reading it as contiguous would take the wrong column
    x = torch.randn(6, 70)
    expected = _cross_entropy(x, target.contiguous(), smoothing=0.1, splits=splits)
    for logits in (_strided(x), x.t().contiguous().t()):
        got = _cross_entropy(logits, target, smoothing=0.1, splits=splits)
        assert all(torch.equal(a, e) for a, e in zip(got, expected))


# ---------------------------------------------------------------- rows split over programs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW], ids=str)
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.2), (False, 1.0)])
def test_split_rows_match_the_reference(dtype, weighted, smoothing):
    n, c = 5, 1000  # not a multiple of any block
    x = (torch.randn(n, c) * 3).to(dtype)
    t = torch.randint(0, c, (n,))
    t[2] = -100
    w = torch.rand(c).add(0.1).to(dtype) if weighted else None
    ref_rows, ref_grad = ops.cross_entropy(x, t, w, label_smoothing=smoothing, reduction="none", backend="reference")
    _, ref_mean_grad = ops.cross_entropy(x, t, w, label_smoothing=smoothing, backend="reference")
    tol = dict(atol=1e-6, rtol=1e-5) if dtype in (torch.float32, torch.float64) else dict(atol=4e-3, rtol=1.6e-2)
    for splits in (1, 2, 3, 7):
        rows, grad = _cross_entropy(x, t, weight=w, smoothing=smoothing, splits=splits)
        torch.testing.assert_close(rows, ref_rows, **tol)
        torch.testing.assert_close(grad, ref_mean_grad, **tol)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), c=st.integers(1, 600), splits=st.integers(1, 6), smoothing=st.sampled_from([0.0, 0.3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_split_rows_property(n, c, splits, smoothing, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 4).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    ref_rows, _ = ops.cross_entropy(x, t, label_smoothing=smoothing, reduction="none", backend="reference")
    _, ref_grad = ops.cross_entropy(x, t, label_smoothing=smoothing, reduction="sum", backend="reference")
    rows, grad = _cross_entropy(x, t, smoothing=smoothing, splits=splits, mean=False)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=1.6e-2)
    torch.testing.assert_close(rows, ref_rows, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)


# ---------------------------------------------------------------- grad_output, decided on the device


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_rescale_touches_nothing_for_a_unit_grad_output(dtype):
    g = torch.randn(5000).to(dtype)
    g[7] = NAN
    saved = g.clone()
    applied = torch.ones((), dtype=torch.float32)
    rescale_([g], torch.ones((), dtype=dtype), applied)
    assert torch.equal(g.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       saved.view(torch.int16 if dtype != torch.float32 else torch.int32))
    rescale_([g], torch.tensor(2.5), applied)  # the first real scaling: exactly torch's product
    expected = (saved.float() * 2.5).to(dtype)
    assert torch.equal(g.isnan(), saved.isnan()) and torch.equal(g[~g.isnan()], expected[~expected.isnan()])
    assert applied.item() == 2.5
    rescale_([g], torch.tensor(0.5), applied)  # a retained graph's next backward: relative to what g holds
    torch.testing.assert_close(g, (saved.float() * 0.5).to(dtype), equal_nan=True, atol=0, rtol=2e-2)


# ---------------------------------------------------------------- linear_cross_entropy in vocabulary chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias,smoothing", [(True, 0.0), (False, 0.1)])
def test_vocabulary_chunks_match_the_reference(dtype, bias, smoothing):
    n, h, v = 9, 16, 301
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) / 2).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    t = torch.randint(0, v, (n,))
    t[4] = -100
    ref = ops.linear_cross_entropy(hidden, weight, t, b, label_smoothing=smoothing, reduction="sum",
                                   backend="reference")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref_rows = ops.linear_cross_entropy(hidden, weight, t, b, label_smoothing=smoothing, reduction="none",
                                        grad_hidden=False, grad_weight=False, grad_bias=False, backend="reference")[0]
    # the logits' gradient is rounded to bf16 before the GEMMs, as in eager's backward
    tol = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10), torch.bfloat16: (5e-2, 3e-2)}[dtype]
    for chunk in (1, 3, 9, 20):  # in rows of logits: 9 chunks, 3 with a partial last, exactly one, one wider than V
        rows, gh, gw, gb = linear_ce_kernel(hidden, weight, t, b, -100, smoothing, chunk, True, True, bias, None)
        assert rows.dtype == acc
        torch.testing.assert_close(rows, ref_rows, atol=tol[0], rtol=tol[1])
        for name, a, e in (("grad_hidden", gh, ref[1]), ("grad_weight", gw, ref[2])) + (
                (("grad_bias", gb, ref[3]),) if bias else ()):
            assert a.dtype == e.dtype, name
            torch.testing.assert_close(a, e, atol=tol[0] * n, rtol=tol[1], msg=lambda m: f"{name} chunk={chunk}: {m}")
