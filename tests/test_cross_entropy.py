"""cross_entropy: every backend against the reference and against torch.nn.functional.cross_entropy;
gradcheck; all-ignored batches; bad inputs; one torch.compile test for both loss ops."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyeff
from pyeff import ops
from pyeff.ops._registry import backend_usable

BACKENDS = [b for b in ("cpu", "triton") if backend_usable(b, torch.device("cpu")) is None]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Per-dtype tolerance (atol, rtol) of a backend against the reference, which computes in the same
# precision: the kernels and torch differ only in summation order and exp's last bits, plus one
# rounding of the result.
TOL = {torch.float32: (2e-6, 2e-5), torch.float64: (1e-12, 1e-10), torch.bfloat16: (4e-3, 1.6e-2),
       torch.float16: (5e-4, 2e-3)}

# (name, kwargs of the op): class weights, smoothing, ignore_index and reductions, alone and mixed.
CASES = [
    ("plain-mean", dict(reduction="mean")),
    ("sum", dict(reduction="sum")),
    ("none", dict(reduction="none")),
    ("smooth", dict(label_smoothing=0.1)),
    ("weight", dict(weighted=True)),
    ("weight-smooth-sum", dict(weighted=True, label_smoothing=0.3, reduction="sum")),
    ("weight-smooth-none", dict(weighted=True, label_smoothing=0.05, reduction="none")),
    ("ignore-0-smooth", dict(ignore_index=0, label_smoothing=0.2)),
    ("smooth-1", dict(label_smoothing=1.0)),
]


def make(n, c, dtype, *, weighted=False, ignore_index=-100, ignored=0.25, scale=3.0, **kw):
    x = (torch.randn(n, c, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, c, (n,))
    t[torch.rand(n) < ignored] = ignore_index
    w = torch.rand(c, dtype=torch.float64).add(0.1).to(dtype) if weighted else None
    args = dict(weight=w, ignore_index=ignore_index, label_smoothing=kw.get("label_smoothing", 0.0),
                reduction=kw.get("reduction", "mean"))
    return x, t, args


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    assert not (actual.isnan() & ~expected.isnan()).any(), f"{what}: NaN where the reference has none"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- backends vs the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_backend_matches_reference(backend, dtype, name, kw):
    for n, c in [(1, 1), (7, 33), (13, 67), (5, 257)]:
        x, t, args = make(n, c, dtype, **kw)
        ref_loss, ref_grad = ops.cross_entropy(x, t, **args, backend="reference")
        loss, grad = ops.cross_entropy(x, t, **args, backend=backend)
        assert_close(loss, ref_loss, dtype, f"loss n={n} c={c}")
        assert_close(grad, ref_grad, dtype, f"grad n={n} c={c}")
        loss_only, empty = ops.cross_entropy(x, t, **args, with_grad=False, backend=backend)
        assert empty.numel() == 0
        assert_close(loss_only, ref_loss, dtype, "loss without grad")


def test_cpu_kernel_writes_every_output():
    # Outputs poisoned with NaN: an element the kernel forgets stays NaN. Rows ignored, strided logits,
    # in place over the logits, and float32 gradients of bfloat16 logits.
    x, t, args = make(9, 67, torch.float32, weighted=True, label_smoothing=0.1)
    rows = torch.full((9,), math.nan)
    grad = torch.full((9, 67), math.nan)
    torch.ops.pyeff.cross_entropy_rows_cpu(x, t, args["weight"], -100, 0.1, 1.0, rows, grad)
    ref_loss, ref_grad = ops.cross_entropy(x, t, **{**args, "reduction": "none"}, backend="reference")
    assert_close(rows, ref_loss, torch.float32, "none")
    assert_close(grad, ref_grad, torch.float32, "none")
    wide = torch.randn(9, 80)
    strided = wide[:, 5:72]  # rows 80 apart
    ref_rows, ref_grad = ops.cross_entropy(strided.clone(), t, reduction="none", backend="reference")
    rows = torch.full((9,), math.nan)
    torch.ops.pyeff.cross_entropy_rows_cpu(strided, t, None, -100, 0.0, 0.5, rows, strided)  # in place
    assert_close(rows, ref_rows, torch.float32, "row losses of strided logits")
    assert_close(strided, ref_grad * 0.5, torch.float32, "grad in place over strided logits")
    xb = torch.randn(9, 67).bfloat16()
    g32 = torch.full((9, 67), math.nan)
    rows = torch.full((9,), math.nan)
    torch.ops.pyeff.cross_entropy_rows_cpu(xb, t, None, -100, 0.2, 1.0, rows, g32)
    ref_rows, ref_grad = ops.cross_entropy(xb.float(), t, label_smoothing=0.2, reduction="none", backend="reference")
    assert_close(rows, ref_rows, torch.float32, "row losses")
    assert_close(g32, ref_grad, torch.float32, "float32 grad of bf16 logits")


def test_cpu_rows_in_place_matches_out_of_place():
    x = torch.randn(11, 300)
    t = torch.randint(0, 300, (11,))
    t[3] = -100
    rows_a, rows_b = torch.empty(11), torch.empty(11)
    grad = torch.full_like(x, math.nan)
    torch.ops.pyeff.cross_entropy_rows_cpu(x, t, None, -100, 0.1, 0.25, rows_a, grad)
    inplace = x.clone()
    torch.ops.pyeff.cross_entropy_rows_cpu(inplace, t, None, -100, 0.1, 0.25, rows_b, inplace)
    assert torch.equal(grad, inplace) and torch.equal(rows_a, rows_b)
    assert torch.equal(grad[3], torch.zeros(300))


@pytest.mark.skipif("triton" not in BACKENDS, reason=f"triton: {backend_usable('triton', torch.device('cpu'))}")
def test_triton_kernel_writes_every_output():
    from pyeff.kernels.cross_entropy import cross_entropy_rows

    x = torch.randn(6, 70)
    t = torch.randint(0, 70, (6,))
    t[0] = -100
    ref_rows, ref_grad = ops.cross_entropy(x, t, label_smoothing=0.1, reduction="none", backend="reference")
    for logits in (x, x.bfloat16()):  # fp32 gradient of fp32 and of bf16 logits
        rows = torch.full((6,), math.nan)
        grad = torch.full((6, 70), math.nan)
        cross_entropy_rows(logits, t, None, -100, 0.1, torch.tensor(0.5), rows, grad)
        exp_rows, exp_grad = ops.cross_entropy(logits.float(), t, label_smoothing=0.1, reduction="none",
                                               backend="reference")
        assert_close(rows, exp_rows, torch.float32, "rows")
        assert_close(grad, exp_grad * 0.5, torch.float32, "grad")
    inplace = x.clone()
    cross_entropy_rows(inplace, t, None, -100, 0.1, torch.tensor(0.5), rows, inplace)
    assert_close(inplace, ref_grad * 0.5, torch.float32, "grad in place")


# ---------------------------------------------------------------- against torch, through autograd


def _torch_and_pyeff(x, t, backend, **kw):
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(xa, t, **kw)
    out = pyeff.nn.functional.cross_entropy(xb, t, **kw, backend=backend)
    # a non-unit grad_output (one value per row for 'none'), exact in every dtype
    go = (0.5 + (torch.arange(ref.numel(), device=ref.device) % 8) / 8).to(ref.dtype).reshape(ref.shape)
    ref.backward(go)
    out.backward(go)
    return ref, xa.grad, out, xb.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_matches_torch_float32(backend, name, kw):
    # Odd sizes, and a 32k+ vocabulary.
    for n, c in [(3, 5), (17, 1001), (37, 32003)]:
        x, t, args = make(n, c, torch.float32, **kw)
        ref, ref_grad, out, grad = _torch_and_pyeff(x, t, backend, **args)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # torch's own fp32 error reaches ~4e-7 here (label smoothing, 32k classes)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
        args64 = {**args, "weight": None if args["weight"] is None else args["weight"].double()}
        exact, exact_grad, _, _ = _torch_and_pyeff(x.double(), t, None, **args64)
        for mine, theirs, truth in ((out, ref, exact), (grad, ref_grad, exact_grad)):  # about as exact as torch
            err, torch_err = (mine.double() - truth).abs().max(), (theirs.double() - truth).abs().max()
            assert err <= max(2 * torch_err, 2e-6 * truth.abs().max()), (err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_matches_torch_bfloat16(backend, name, kw):
    # torch computes bf16 cross-entropy with bf16 intermediates (the log-softmax is rounded), pyeff
    # in fp32 with one rounding at the end: both are compared with the exact value on the same
    # bf16 inputs, and pyeff must be at least as close as torch, within one bf16 ulp.
    for n, c in [(17, 1001), (37, 32003)]:
        x, t, args = make(n, c, torch.bfloat16, **kw)
        ref, ref_grad, out, grad = _torch_and_pyeff(x, t, backend, **args)
        args64 = {**args, "weight": None if args["weight"] is None else args["weight"].double()}
        exact, exact_grad, _, _ = _torch_and_pyeff(x.double(), t, None, **args64)
        for mine, theirs, truth in ((out, ref, exact), (grad, ref_grad, exact_grad)):
            assert mine.dtype == torch.bfloat16
            # two roundings (the gradient, then its product with grad_output)
            ulp = truth.abs().clamp_min(1e-30) * 2**-7
            err = (mine.double() - truth).abs()
            assert (err <= ulp + 1e-7).all(), f"max error {err.max()}"
            torch.testing.assert_close(mine, theirs, atol=2e-3, rtol=3e-2)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing,weighted", [(0.0, False), (0.2, True)])
def test_all_ignored_matches_torch(backend, reduction, smoothing, weighted):
    # torch: mean over no rows is nan, sum 0, none zeros; the gradient is zero everywhere.
    x = torch.randn(5, 9)
    t = torch.full((5,), -100)
    w = torch.rand(9) if weighted else None
    ref, ref_grad, out, grad = _torch_and_pyeff(x, t, backend, weight=w, reduction=reduction,
                                                label_smoothing=smoothing)
    torch.testing.assert_close(out, ref, equal_nan=True, atol=0, rtol=0)
    assert torch.equal(grad, ref_grad) and torch.equal(grad, torch.zeros_like(grad))
    empty = torch.randn(0, 9, requires_grad=True)
    loss = pyeff.nn.functional.cross_entropy(empty, t[:0], reduction=reduction, backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(empty, t[:0], reduction=reduction), equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_like_torch(backend):
    # (C,) with a 0-d target; (N, C, d1, d2) with the classes in dim 1; uint8 targets.
    for shape, tshape in [((7,), ()), ((3, 7, 4, 5), (3, 4, 5)), ((2, 7, 1), (2, 1))]:
        x = torch.randn(shape)
        t = torch.randint(0, 7, tshape)
        for reduction in ("none", "mean"):
            ref, ref_grad, out, grad = _torch_and_pyeff(x, t, backend, reduction=reduction, label_smoothing=0.1)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(grad, ref_grad)
    x = torch.randn(4, 6)
    t = torch.randint(0, 6, (4,))
    ref, ref_grad, out, grad = _torch_and_pyeff(x, t.to(torch.uint8), backend)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_backward_scales_the_saved_gradient_and_can_run_twice():
    x = torch.randn(6, 10, requires_grad=True)
    t = torch.randint(0, 10, (6,))
    loss = pyeff.nn.functional.cross_entropy(x, t)
    (3 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # retain_graph: the saved gradient was not consumed
    xr = x.detach().requires_grad_()
    F.cross_entropy(xr, t).backward()
    torch.testing.assert_close(first, 3 * xr.grad)
    torch.testing.assert_close(x.grad, 4 * xr.grad)
    with torch.no_grad():
        assert pyeff.nn.functional.cross_entropy(x, t).grad_fn is None


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing,weighted,ignore", [(0.0, False, -100), (0.3, True, 2), (0.1, False, 0)])
def test_gradcheck(backend, reduction, smoothing, weighted, ignore):
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 2, 0, 5])
    w = torch.rand(6, dtype=torch.float64) + 0.5 if weighted else None
    fn = lambda x: pyeff.nn.functional.cross_entropy(x, t, weight=w, ignore_index=ignore, reduction=reduction,  # noqa
                                                     label_smoothing=smoothing, backend=backend)
    assert torch.autograd.gradcheck(fn, (x,))


def test_module_is_torch_compatible():
    w = torch.rand(5)
    mine = pyeff.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.2)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.2)
    assert isinstance(mine, torch.nn.CrossEntropyLoss)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    assert repr(mine) == repr(theirs)
    x = torch.randn(8, 5, requires_grad=True)
    t = torch.randint(0, 5, (8,))
    torch.testing.assert_close(mine(x, t), theirs(x, t))
    legacy = pyeff.nn.CrossEntropyLoss(size_average=False)  # the deprecated arguments still map
    assert legacy.reduction == "sum"
    torch.testing.assert_close(legacy(x, t), F.cross_entropy(x, t, reduction="sum"))
    # A negative smoothing means none, as in torch.
    torch.testing.assert_close(pyeff.nn.functional.cross_entropy(x, t, label_smoothing=-0.5), F.cross_entropy(x, t))


# ---------------------------------------------------------------- bad inputs


def _bad(kind):
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 2, 3])
    return {
        "target int32": (x, t.int(), {}),
        "target float (probabilities)": (x, torch.rand(4, 5), {}),
        "batch mismatch": (x, t[:3], {}),
        "target out of range": (x, torch.tensor([0, 1, 2, 5]), {}),
        "negative target": (x, torch.tensor([0, -1, 2, 3]), {}),
        "weight shape": (x, t, {"weight": torch.rand(4)}),
        "weight dtype": (x, t, {"weight": torch.rand(5, dtype=torch.float64)}),
        "reduction": (x, t, {"reduction": "avg"}),
        "label_smoothing": (x, t, {"label_smoothing": 1.5}),
        "weight requires grad": (x.requires_grad_(), t, {"weight": torch.rand(5, requires_grad=True)}),
        "nd target shape": (torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), {}),
    }[kind]


# (kind, exception, message regex, torch raises the same exception type)
BAD_INPUTS = [
    ("target int32", RuntimeError, r"Long or Byte.*int32", True),
    ("target float (probabilities)", RuntimeError, r"class-probability targets .* not supported", False),
    ("batch mismatch", ValueError, r"Expected input batch_size \(4\) to match target batch_size \(3\)", True),
    ("target out of range", IndexError, r"Target 5 is out of bounds", True),
    ("negative target", IndexError, r"Target -1 is out of bounds", True),
    ("weight shape", RuntimeError, r"weight tensor should be defined either for all 5 classes", True),
    ("weight dtype", RuntimeError, r"expected weight of dtype torch.float32", True),
    ("reduction", ValueError, r"avg is not a valid value for reduction", True),
    ("label_smoothing", RuntimeError, r"label_smoothing must be between 0.0 and 1.0", True),
    ("weight requires grad", RuntimeError, r"not differentiable with respect to the class weights", True),
    ("nd target shape", RuntimeError, r"Expected target size \[2, 3\], got \[2, 4\]", True),
]


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("kind,exc,regex,like_torch", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise(backend, kind, exc, regex, like_torch):
    x, t, kw = _bad(kind)
    with pytest.raises(exc, match=regex):
        pyeff.nn.functional.cross_entropy(x, t, **kw, backend=backend).sum().backward()
    if like_torch:
        with pytest.raises(exc):
            F.cross_entropy(x, t, **kw).sum().backward()


CPU_OP_BAD = [
    ("grad overlaps logits", lambda x: (lambda big: (big[:, :5], big[:, 1:]))(torch.randn(4, 6)),
     r"grad must be either logits itself"),
    ("grad dtype", lambda x: (x, torch.empty(x.shape, dtype=torch.float64)), r"expected grad to be Float"),
    ("grad shape", lambda x: (x, torch.empty(4, 6)), r"expected grad of shape \[4, 5\]"),
    ("logits columns strided", lambda x: (torch.randn(5, 4).t(), torch.empty(4, 5)), r"contiguous columns"),
]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="pyeff._C is not built")
@pytest.mark.parametrize("kind,make_args,regex", CPU_OP_BAD, ids=[b[0] for b in CPU_OP_BAD])
def test_cpu_op_rejects_bad_buffers_before_writing(kind, make_args, regex):
    x = torch.randn(4, 5)
    logits, grad = make_args(x)
    before = logits.clone()
    rows = torch.full((4,), 7.0)
    with pytest.raises(RuntimeError, match=regex):
        torch.ops.pyeff.cross_entropy_rows_cpu(logits, torch.tensor([0, 1, 2, 3]), None, -100, 0.0, 1.0, rows, grad)
    assert torch.equal(logits, before) and (rows == 7.0).all()
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        torch.ops.pyeff.cross_entropy_rows_cpu(x, torch.tensor([0, 9, 2, 3]), None, -100, 0.0, 1.0, rows, None)
    assert (rows == 7.0).all()


# ---------------------------------------------------------------- property test


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 9), c=st.integers(1, 90), dtype=st.sampled_from(DTYPES),
       backend=st.sampled_from(BACKENDS), weighted=st.booleans(), smoothing=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
       reduction=st.sampled_from(["mean", "sum", "none"]), ignored=st.sampled_from([0.0, 0.5, 1.0]),
       ignore_index=st.sampled_from([-100, 0, 3]), scale=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2**16))
def test_property_matches_reference(n, c, dtype, backend, weighted, smoothing, reduction, ignored, ignore_index,
                                    scale, seed):
    torch.manual_seed(seed)
    x, t, args = make(n, c, dtype, weighted=weighted, ignore_index=ignore_index, ignored=ignored, scale=scale,
                      label_smoothing=smoothing, reduction=reduction)
    t = torch.where((t >= c) & (t != ignore_index), 0, t)
    ref_loss, ref_grad = ops.cross_entropy(x, t, **args, backend="reference")
    loss, grad = ops.cross_entropy(x, t, **args, backend=backend)
    atol, rtol = TOL[dtype]
    mag = scale * (1 + smoothing)  # the loss grows with the logits' scale
    torch.testing.assert_close(loss, ref_loss, atol=atol * mag, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol, equal_nan=True)


# ---------------------------------------------------------------- torch.compile and opcheck


def test_custom_ops_pass_opcheck():
    from pyeff.ops import CROSS_ENTROPY, LINEAR_CROSS_ENTROPY

    x, t = torch.randn(5, 7), torch.tensor([0, 6, -100, 3, 1])
    backend = BACKENDS[0] if BACKENDS else "reference"
    torch.library.opcheck(CROSS_ENTROPY.overload(backend), (x, t, None, -100, 0.1, "mean", True),
                          test_utils=("test_schema", "test_faketensor"))
    h, w, b = torch.randn(5, 4), torch.randn(7, 4), torch.randn(7)
    torch.library.opcheck(LINEAR_CROSS_ENTROPY.overload(backend), (h, w, t, b, -100, 0.0, "sum", 2, True, True, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_models_using_the_losses_compile():
    # One small compiled graph holding both loss ops (fullgraph: no graph break around them).
    torch._dynamo.reset()
    x = torch.randn(6, 9, requires_grad=True)
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    t = torch.tensor([0, 8, 3, -100, 5, 1])

    def step(x, h, w):
        return (pyeff.nn.functional.cross_entropy(x * 2, t, label_smoothing=0.1)
                + pyeff.nn.functional.linear_cross_entropy(h.sin(), w, t, chunk_size=4))

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, h, w)
    out.backward()
    grads = [p.grad.clone() for p in (x, h, w)]
    for p in (x, h, w):
        p.grad = None
    expected = F.cross_entropy(x * 2, t, label_smoothing=0.1) + F.cross_entropy(F.linear(h.sin(), w), t)
    expected.backward()
    torch.testing.assert_close(out, expected)
    for g, p in zip(grads, (x, h, w)):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_like_torch(backend):
    # Under autocast torch runs cross-entropy in fp32 (fp32 loss), and linear in bf16.
    x = torch.randn(6, 40, dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    t = torch.randint(0, 40, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(x, t)
        out = pyeff.nn.functional.cross_entropy(x, t, backend=backend)
        ref_lin = F.cross_entropy(F.linear(h, w), t)
        out_lin = pyeff.nn.functional.linear_cross_entropy(h, w, t, backend=backend)
    assert out.dtype == ref.dtype == torch.float32 and out_lin.dtype == ref_lin.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_lin, ref_lin, atol=1e-2, rtol=1e-2)
    (g_ref,) = torch.autograd.grad(ref, x)
    (g_out,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(g_out, g_ref)
    grads = torch.autograd.grad(out_lin, (h, w))
    ref_grads = torch.autograd.grad(ref_lin, (h, w))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_lower_isa_variants_agree(isa, run_with_isa):
    # Each per-ISA build of the kernel (other vector widths, other exp code) matches the reference.
    code = """
import sys, torch, pyeff
from pyeff import ops
torch.manual_seed(0)
x = torch.randn(9, 301) * 3; t = torch.randint(0, 301, (9,)); t[2] = -100; w = torch.rand(301)
for dtype in (torch.float32, torch.bfloat16):
    loss, grad = ops.cross_entropy(x.to(dtype), t, w.to(dtype), -100, 0.1, "none", backend="cpu")
    ref_loss, ref_grad = ops.cross_entropy(x.to(dtype), t, w.to(dtype), -100, 0.1, "none", backend="reference")
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=1e-6 if dtype == torch.float32 else 4e-3,
                               rtol=1e-5 if dtype == torch.float32 else 1.6e-2)
"""
    run_with_isa(code, isa)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gpu_triton_matches_reference_and_torch(dtype):
    for n, c in [(5, 7), (37, 32003)]:
        x, t, args = make(n, c, dtype, weighted=True, label_smoothing=0.1)
        x, t = x.cuda(), t.cuda()
        args["weight"] = args["weight"].cuda()
        for reduction in ("mean", "none"):
            args["reduction"] = reduction
            ref = ops.cross_entropy(x, t, **args, backend="reference")
            out = ops.cross_entropy(x, t, **args, backend="triton")
            assert_close(out[0], ref[0], dtype, f"loss {reduction}")
            assert_close(out[1], ref[1], dtype, f"grad {reduction}")
        if dtype == torch.float32:  # the default backend on CUDA tensors, against torch
            ref, ref_grad, got, grad = _torch_and_pyeff(x, t, None, **args)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
