"""The fused layers compiled for a GPU (TRITON_INTERPRET=0 pytest -m gpu): every layer's forward and
backward without a host sync (torch.cuda.set_sync_debug_mode("error")), NaN kept through the GPU's
own bf16 conversions, cross-entropy rows split over programs, and linear_cross_entropy's bf16 GEMMs,
each against the reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import pyeff.nn.functional as PF
from pyeff import ops

pytestmark = pytest.mark.gpu

N, D, V = 64, 1000, 50257


def _layers():
    """name -> a forward on fresh leaf inputs, for every fused layer (LAYERS)."""
    def leaf(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

    target = torch.randint(0, V, (N, 2), device="cuda")[:, 0]  # a strided target
    target[3] = -100
    return {
        "layer_norm": lambda: PF.layer_norm(leaf(N, D), (D,), leaf(D), leaf(D)),
        "rms_norm": lambda: PF.rms_norm(leaf(N, D), (D,), leaf(D)),
        "add_layer_norm": lambda: sum(PF.add_layer_norm(leaf(N, D), leaf(N, D), (D,), leaf(D), leaf(D))),
        "add_rms_norm": lambda: sum(PF.add_rms_norm(leaf(N, D), leaf(N, D), (D,), leaf(D))),
        "bias_gelu": lambda: PF.bias_gelu(leaf(N, D), leaf(D), approximate="tanh"),
        "swiglu_packed": lambda: PF.swiglu(leaf(N, 2 * D)),
        "swiglu": lambda: PF.swiglu(leaf(N, D), leaf(N, D)),
        "cross_entropy": lambda: PF.cross_entropy(leaf(N, V), target, label_smoothing=0.1),
        "cross_entropy_8_rows": lambda: PF.cross_entropy(leaf(8, V), target[:8], reduction="sum"),
        "cross_entropy_weighted": lambda: PF.cross_entropy(leaf(N, 997), target % 997,
                                                           weight=torch.rand(997, device="cuda").bfloat16()),
        "cross_entropy_none": lambda: PF.cross_entropy(leaf(N, 997), target % 997, reduction="none").sum(),
        "linear_cross_entropy": lambda: PF.linear_cross_entropy(leaf(N, 256), leaf(V, 256), target, leaf(V)),
    }


LAYERS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "bias_gelu", "swiglu_packed", "swiglu",
          "cross_entropy", "cross_entropy_8_rows", "cross_entropy_weighted", "cross_entropy_none",
          "linear_cross_entropy"]


@pytest.mark.parametrize("layer", LAYERS)
def test_forward_and_backward_never_sync(layer):
    run = _layers()[layer]
    run().float().sum().backward()  # first calls compile the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run().float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_loss_backward_with_unit_grad_output_touches_nothing():
    x = torch.randn(N, V, device="cuda", requires_grad=True)
    t = torch.randint(0, V, (N,), device="cuda")
    loss = PF.cross_entropy(x, t)
    saved = loss.grad_fn.saved_tensors[0]
    before = saved.clone()
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert grad.data_ptr() == saved.data_ptr() and torch.equal(grad, before)  # the saved gradient itself
    (grad2,) = torch.autograd.grad(loss, x, torch.tensor(3.0, device="cuda"))  # a retained graph, scaled
    torch.testing.assert_close(grad2, before * 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_nan_stays_nan_on_the_gpu(dtype):
    # The GPU's canonical NaN (0x7FFFFFFF) once became -0.0 in the bf16 store.
    x = torch.randn(8, 300, device="cuda", dtype=dtype)
    x[2, 5] = math.nan
    w = torch.ones(300, device="cuda", dtype=dtype)
    for y in (PF.layer_norm(x, (300,), w), PF.rms_norm(x, (300,), w), PF.bias_gelu(x), PF.swiglu(x, x)):
        assert y[2].isnan().any() and not y[[0, 1, 3]].isnan().any()
    loss = PF.cross_entropy(x.float().requires_grad_(), torch.zeros(8, dtype=torch.long, device="cuda"),
                            reduction="none")
    assert loss[2].isnan() and not loss[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("rows", [1, 8, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cross_entropy_few_and_many_rows_match_the_reference(rows, dtype):
    x = (torch.randn(rows, 128256, device="cuda") * 3).to(dtype)
    t = torch.randint(0, 128256, (rows,), device="cuda")
    for kw in (dict(), dict(label_smoothing=0.1, reduction="sum")):
        ref = ops.cross_entropy(x, t, **kw, backend="reference")
        out = ops.cross_entropy(x, t, **kw, backend="triton")
        tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=4e-3, rtol=1.6e-2)
        for a, e in zip(out, ref):
            torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_cross_entropy_low_precision_matches_eager(dtype):
    # bf16/fp16 GEMMs with fp32 accumulation: at least as close to the fp64 truth as eager torch.
    h = torch.randn(512, 512, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(32000, 512, device="cuda", dtype=dtype) / 512**0.5).requires_grad_()
    t = torch.randint(0, 32000, (512,), device="cuda")
    grads = torch.autograd.grad(PF.linear_cross_entropy(h, w, t), (h, w))
    eager = torch.autograd.grad(F.cross_entropy(F.linear(h, w).float(), t), (h, w))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = torch.autograd.grad(F.cross_entropy(F.linear(h64, w64), t), (h64, w64))
    for mine, theirs, exact in zip(grads, eager, truth):
        err, torch_err = (mine.double() - exact).norm(), (theirs.double() - exact).norm()
        assert err <= 1.5 * torch_err, (err, torch_err)
