"""linear_cross_entropy: every backend against the reference and against eager torch (linear +
cross_entropy through autograd); gradcheck; fp32 accumulation of grad_weight; no full logits."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import pyeff
from pyeff import ops
from pyeff.ops._registry import backend_usable

BACKENDS = [b for b in ("cpu", "triton") if backend_usable(b, torch.device("cpu")) is None]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (atol, rtol) against the reference: the same math, but matrix products over chunks (another
# summation order inside torch.mm / addmm) and, for bf16/fp16, one rounding of each result.
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10), torch.bfloat16: (1e-2, 1.6e-2),
       torch.float16: (2e-3, 2e-3)}

CASES = [
    ("bias-mean", dict(bias=True)),
    ("nobias-sum", dict(bias=False, reduction="sum")),
    ("smooth", dict(bias=True, label_smoothing=0.1)),
    ("ignore-3-smooth-sum", dict(bias=False, ignore_index=3, label_smoothing=0.3, reduction="sum")),
]


def make(n, h, v, dtype, *, bias=True, ignore_index=-100, ignored=0.25, **kw):
    hidden = torch.randn(n, h, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, dtype=torch.float64) / h**0.5 * 3).to(dtype)
    b = torch.randn(v, dtype=torch.float64).to(dtype) if bias else None
    t = torch.randint(0, v, (n,))
    t[torch.rand(n) < ignored] = ignore_index
    return hidden, weight, t, b, dict(ignore_index=ignore_index, label_smoothing=kw.get("label_smoothing", 0.0),
                                      reduction=kw.get("reduction", "mean"))


def assert_close(actual, expected, dtype, what, scale=1.0):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert not (actual.isnan() & ~expected.isnan()).any(), f"{what}: NaN where the reference has none"
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_backend_matches_reference(backend, dtype, name, kw):
    for n, h, v, chunk in [(1, 3, 1, 1), (13, 7, 67, 4), (9, 16, 301, 100)]:
        hidden, weight, t, b, args = make(n, h, v, dtype, **kw)
        ref = ops.linear_cross_entropy(hidden, weight, t, b, **args, chunk_size=chunk, backend="reference")
        out = ops.linear_cross_entropy(hidden, weight, t, b, **args, chunk_size=chunk, backend=backend)
        for name_, a, e in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), out, ref):
            # sums over rows grow with n for reduction 'sum'
            assert_close(a, e, dtype, f"{name_} n={n} v={v}", scale=n if args["reduction"] == "sum" else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_weight_is_accumulated_in_float32(backend):
    # 64 chunks of one row each on the CPU, 40 vocabulary chunks with Triton (NOTE [vocabulary
    # chunks]): accumulated in bf16, grad_weight would be off by many ulps; in fp32 it is one fp32
    # product, then one rounding to bf16, of the logits' gradient (rounded to bf16 first with Triton,
    # whose GEMMs take it in the input dtype, as eager's backward does).
    hidden, weight, t, b, args = make(64, 8, 40, torch.bfloat16, ignored=0.0)
    _, _, gw, gb = ops.linear_cross_entropy(hidden, weight, t, b, chunk_size=1, backend=backend)
    _, g = ops.cross_entropy(F.linear(hidden, weight, b).float(), t, backend="reference")
    if backend == "triton":
        g = g.to(torch.bfloat16).float()
    for mine, ref in ((gw, (g.t() @ hidden.float()).to(torch.bfloat16)), (gb, g.sum(0).to(torch.bfloat16))):
        ulp = ref.double().abs().clamp_min(2**-100) * 2**-7  # one bf16 ulp (or two halves)
        assert ((mine.double() - ref.double()).abs() <= ulp + 1e-6).all()


def _torch_and_pyeff(hidden, weight, t, b, backend, chunk_size=None, **kw):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    ref = F.cross_entropy(F.linear(leaves[0], leaves[1], leaves[2]), t, **kw)
    ref.backward(torch.tensor(1.5, dtype=ref.dtype))
    mine = [x.detach().clone().requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    out = pyeff.nn.functional.linear_cross_entropy(mine[0], mine[1], t, mine[2], **kw, chunk_size=chunk_size,
                                                   backend=backend)
    out.backward(torch.tensor(1.5, dtype=out.dtype))
    return ([ref] + [x.grad for x in leaves if x is not None]), ([out] + [x.grad for x in mine if x is not None])


def _eager_row_sum_error(hidden, weight, b, t, args, grad_output):
    """Bounds, per element of grad_hidden, grad_weight and grad_bias, on what one rounding in eager
    torch's fp32 reference adds to them (pyeff computes the logits' gradient in closed form and has
    no such sum).

    log_softmax's backward sums the incoming gradient of each row over its V classes in fp32,
    s = sum_v g_v, and every logit's gradient g_v - p_v * s inherits that sum's error ds. With label
    smoothing all V terms are nonzero and nearly equal (eps / V each), so their rounding errors do
    not cancel the way independent ones would (the probabilistic sqrt(V) u): the bound is the
    deterministic one for recursive summation in any order, |ds| <= gamma_(m-1) sum_v |g_v| with m
    the number of nonzero terms and gamma_n = n u / (1 - n u), u = 2**-24 (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., section 4.2). For V = 32003 that is 1.9e-3 sum|g|;
    measured on this test's inputs: |ds| = 4.8e-5 sum|g| with AVX2 kernels (8 lanes, 4000 terms
    each), 1.1e-5 with AVX-512: the reference's own rounding, which failed this test on AVX2
    machines under a fixed atol. The gradients then err by ds_i p_iv times W (grad_hidden), hidden
    (grad_weight) or 1 (grad_bias), bounded here with fp64 probabilities."""
    valid = t != args["ignore_index"]
    per_row = grad_output / (valid.sum() if args["reduction"] == "mean" else 1)  # sum_v |g_v| of a valid row
    m = weight.shape[0] if args["label_smoothing"] > 0 else 1
    u = 2.0**-24
    gamma = (m - 1) * u / (1 - (m - 1) * u)
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden.double(), weight.double(), None if b is None else b.double())
        p_ds = logits.softmax(-1) * (gamma * per_row * valid.double()).unsqueeze(1)  # p_iv |ds_i|
        return p_ds @ weight.double().abs(), p_ds.t() @ hidden.double().abs(), p_ds.sum(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(backend, name, kw):
    # A 32k+ vocabulary at odd sizes, fp32 and bf16, against eager torch through autograd.
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, t, b, args = make(37, 16, 32003, dtype, **kw)
        ref, out = _torch_and_pyeff(hidden, weight, t, b, backend, chunk_size=8, **args)
        if dtype == torch.float32:
            extra = [0.0, *_eager_row_sum_error(hidden, weight, b, t, args, grad_output=1.5)]
        for i, (name_, a, e) in enumerate(zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), out, ref)):
            if dtype == torch.float32:  # products' roundings (atol, rtol) and eager's row sums (extra)
                err = (a.double() - e.double()).abs()
                allowed = 1e-5 + 1e-4 * e.double().abs() + extra[i]
                assert not a.isnan().any() and (err <= allowed).all(), (
                    f"{name_}: {(err > allowed).sum().item()} of {err.numel()} elements off, worst by "
                    f"{err.max().item():.3e} (allowed there {allowed.flatten()[err.argmax()].item():.3e})")
            else:  # eager rounds its logits' gradient to bf16 before the products; the CPU keeps it in fp32
                scale = e.float().abs().max().item()
                torch.testing.assert_close(a.float(), e.float(), atol=3e-2 * scale, rtol=3e-2,
                                           msg=lambda m: f"{name_}: {m}")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_matches_torch(backend, reduction):
    hidden, weight, t, b, args = make(6, 5, 11, torch.float32, ignored=1.0, reduction=reduction,
                                      label_smoothing=0.1)
    ref, out = _torch_and_pyeff(hidden, weight, t, b, backend, chunk_size=4, **args)
    torch.testing.assert_close(out[0], ref[0], equal_nan=True, atol=0, rtol=0)  # nan for 'mean', as torch
    for a, e in zip(out[1:], ref[1:]):
        assert torch.equal(a, e) and not a.any()


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("bias,reduction,smoothing", [(True, "mean", 0.0), (False, "sum", 0.2), (True, "sum", 0.5)])
def test_gradcheck(backend, bias, reduction, smoothing):
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.tensor([0, 6, -100, 3, 3])

    def fn(hidden, weight, *b):
        return pyeff.nn.functional.linear_cross_entropy(hidden, weight, t, b[0] if b else None, reduction=reduction,
                                                        label_smoothing=smoothing, chunk_size=2, backend=backend)

    assert torch.autograd.gradcheck(fn, (hidden, weight, *([b] if bias else [])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_asked_gradients_and_leading_dims(backend):
    # A frozen weight gets no gradient (and none is computed); hidden may have leading dims.
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    weight = torch.randn(13, 6)
    t = torch.randint(0, 13, (2, 5))
    loss = pyeff.nn.functional.linear_cross_entropy(hidden, weight, t, backend=backend)
    loss.backward()
    ref_hidden = hidden.detach().requires_grad_()
    F.cross_entropy(F.linear(ref_hidden, weight).flatten(0, 1), t.flatten()).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)
    out = ops.linear_cross_entropy(hidden.detach().flatten(0, 1), weight, t.flatten(), grad_weight=False,
                                   backend=backend)
    assert out[2].numel() == 0 and out[3].numel() == 0
    with torch.no_grad():  # 'none' works without gradients
        rows = pyeff.nn.functional.linear_cross_entropy(hidden, weight, t, reduction="none", backend=backend)
    torch.testing.assert_close(rows, F.cross_entropy(F.linear(hidden, weight).transpose(1, 2), t, reduction="none"))


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates (ops that write into
    existing tensors, such as the Triton interpreter's copies back to its arguments, create none)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_never_materialises_the_logits(backend, dtype):
    n, h, v, chunk = 40, 8, 300, 6
    hidden, weight, t, b, args = make(n, h, v, dtype)
    impls = ops.LINEAR_CROSS_ENTROPY.python_impls  # called directly: the mode sees inside them
    with _LargestTensor() as mode:
        impls[backend](hidden, weight, t, b, -100, 0.0, "mean", chunk, True, True, True)
    assert mode.largest <= max(chunk * v, v * h), mode.largest  # a chunk of logits, or grad_weight
    with _LargestTensor() as mode:
        impls["reference"](hidden, weight, t, b, -100, 0.0, "mean", chunk, True, True, True)
    assert mode.largest >= n * v  # the check sees the full logits where they exist


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("kind,exc,regex", [
    ("target int32", RuntimeError, r"Long or Byte"),
    ("target float", RuntimeError, r"class-probability targets"),
    ("target shape", ValueError, r"Expected target of shape \[4\]"),
    ("target out of range", IndexError, r"Target 7 is out of bounds"),
    ("weight shape", ValueError, r"Invalid weight shape"),
    ("bias shape", ValueError, r"Invalid bias shape"),
    ("weight dtype", RuntimeError, r"`weight` is torch.float64 .* pass them in one dtype"),
    ("reduction", ValueError, r"sumall is not a valid value for reduction"),
    ("none with grad", RuntimeError, r"reduction='none'.*use reduction 'mean' or 'sum'"),
    ("chunk_size", ValueError, r"Invalid chunk_size: 0"),
    ("label_smoothing", RuntimeError, r"label_smoothing must be between 0.0 and 1.0"),
])
def test_bad_inputs_raise(backend, kind, exc, regex):
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(7, 3, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    args, kw = [hidden, weight, t, None], {}
    if kind == "target int32":
        args[2] = t.int()
    elif kind == "target float":
        args[2] = t.float()
    elif kind == "target shape":
        args[2] = t[:3]
    elif kind == "target out of range":
        args[2] = torch.tensor([0, 7, 2, 3])
    elif kind == "weight shape":
        args[1] = torch.randn(7, 4)
    elif kind == "bias shape":
        args[3] = torch.randn(6)
    elif kind == "weight dtype":
        args[1] = torch.randn(7, 3, dtype=torch.float64)
    elif kind == "reduction":
        kw["reduction"] = "sumall"
    elif kind == "none with grad":
        kw["reduction"] = "none"
    elif kind == "chunk_size":
        kw["chunk_size"] = 0
    elif kind == "label_smoothing":
        kw["label_smoothing"] = 2.0
    with pytest.raises(exc, match=regex):
        pyeff.nn.functional.linear_cross_entropy(*args, **kw, backend=backend).backward()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 12), h=st.integers(1, 9), v=st.integers(1, 70), chunk=st.integers(1, 13),
       dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS), bias=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.1, 1.0]), reduction=st.sampled_from(["mean", "sum"]),
       ignored=st.sampled_from([0.0, 0.5, 1.0]), grads=st.sampled_from([(1, 1, 1), (1, 0, 0), (0, 1, 1), (0, 0, 0)]),
       seed=st.integers(0, 2**16))
def test_property_matches_reference(n, h, v, chunk, dtype, backend, bias, smoothing, reduction, ignored, grads, seed):
    torch.manual_seed(seed)
    hidden, weight, t, b, args = make(n, h, v, dtype, bias=bias, ignored=ignored, label_smoothing=smoothing,
                                      reduction=reduction)
    flags = dict(grad_hidden=bool(grads[0]), grad_weight=bool(grads[1]), grad_bias=bool(grads[2]))
    ref = ops.linear_cross_entropy(hidden, weight, t, b, **args, chunk_size=chunk, **flags, backend="reference")
    out = ops.linear_cross_entropy(hidden, weight, t, b, **args, chunk_size=chunk, **flags, backend=backend)
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), out, ref):
        assert_close(a, e, dtype, name, scale=max(1, n) if reduction == "sum" else 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_triton_matches_reference(dtype):
    hidden, weight, t, b, args = make(300, 64, 32003, dtype, label_smoothing=0.1)
    hidden, weight, t, b = hidden.cuda(), weight.cuda(), t.cuda(), b.cuda()
    ref = ops.linear_cross_entropy(hidden, weight, t, b, **args, chunk_size=64, backend="reference")
    out = ops.linear_cross_entropy(hidden, weight, t, b, **args, chunk_size=64, backend="triton")
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), out, ref):
        assert_close(a, e, dtype, name)
    peaks = {}
    for backend in ("reference", "triton"):
        del out
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = ops.linear_cross_entropy(hidden, weight, t, b, **args, chunk_size=64, backend=backend)
        peaks[backend] = torch.cuda.max_memory_allocated() - before
    assert peaks["triton"] < peaks["reference"] / 2, peaks  # the reference holds the full logits
