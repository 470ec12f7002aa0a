r"""linear_cross_entropy: cross_entropy(hidden @ weight.T + bias, target) without the full logits.

The contract, for hidden h (N, H), weight A (V, H), bias b (V,) or none, int64 target (N,), with
opmath = fp32 for bf16/fp16 inputs and fp64 for fp64:

.. math::
    z &= h A^\top + b \quad \text{(in the input dtype, as torch.nn.functional.linear)} \\
    \text{loss}, g &= \text{cross\_entropy}(z, t, \text{ignore\_index}, \epsilon, \text{reduction})
        \quad \text{(pyeff/ops/cross\_entropy.py, in opmath; } g = \partial\text{loss}/\partial z) \\
    \nabla_h &= \text{round}(g)\, A \quad \text{(input dtype, as eager's backward)} \\
    \nabla_A &= g^\top h, \qquad \nabla_b = \textstyle\sum_r g_r \quad \text{(accumulated in opmath, returned in
        A's and b's dtype)}

The loss is in opmath (the layer rounds it to the input dtype, or keeps fp32 under autocast).

The gradients are for a unit grad_output; each is computed only when asked for (else an empty
tensor). The backends never hold the (N, V) logits. On the CPU, rows go in chunks of `chunk_size`;
per chunk they compute its logits, its losses and logit gradient (in place over the chunk's own
logits, or into an fp32 chunk buffer for bf16/fp16), then its rows of grad_hidden, and add its
share to the opmath accumulators of grad_weight and grad_bias; the softmax, loss and gradient of a
chunk are the C++ cross_entropy_rows kernel. The Triton backend goes in chunks of the vocabulary
instead, each holding as many logits as `chunk_size` rows would (NOTE [vocabulary chunks],
kernels/linear_cross_entropy.py): grad_weight is finished chunk by chunk in one GEMM of its input
dtype with fp32 accumulation, from g rounded to the input dtype as in eager's backward, and no
opmath copy of it is ever held. `chunk_size` 0 lets the backend choose (default_chunk_size on the
CPU; one for the device with Triton). The matrix products stay in torch. Gradients with reduction
'none' would need the per-row grad_output, unknown during the forward: refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._dtypes import opmath_dtype
from ._registry import Op
from .cross_entropy import REDUCTIONS, check_targets, cross_entropy_reference, reduce_rows, reduction_scale

LINEAR_CROSS_ENTROPY = Op("linear_cross_entropy")

# The default chunk holds about as many logits as hidden has elements (the activations the layer
# already keeps), but at least MIN_CHUNK_ROWS rows, below which the CPU's matrix products lose
# efficiency (measured: 128 rows ~15% slower than 256 at H=256, V=32k), unless that is more than an
# eighth of all rows, so that a chunk stays a small fraction of the full logits.
MIN_CHUNK_ROWS = 256


def default_chunk_size(rows: int, hidden_size: int, vocab: int) -> int:
    floor = min(MIN_CHUNK_ROWS, math.ceil(rows / 8))
    return max(1, min(rows, max(floor, math.ceil(rows * hidden_size / max(1, vocab)))))


@LINEAR_CROSS_ENTROPY.reference
def linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int, label_smoothing: float,
    reduction: str, chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = opmath_dtype(hidden.dtype)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    with_grad = grad_hidden or grad_weight or grad_bias
    loss, g = cross_entropy_reference(logits.to(acc), target, None, ignore_index, label_smoothing, reduction,
                                      with_grad)
    empty = hidden.new_empty((0,))
    gh = g.to(hidden.dtype) @ weight if grad_hidden else empty
    gw = (g.t() @ hidden.to(acc)).to(weight.dtype) if grad_weight else empty
    gb = g.sum(0).to(bias.dtype) if grad_bias else empty
    return loss, gh, gw, gb


@LINEAR_CROSS_ENTROPY.impl("cpu")
def linear_cross_entropy_cpu(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size,
                             grad_hidden, grad_weight, grad_bias):
    n, h = hidden.shape
    v = weight.shape[0]
    chunk_size = chunk_size or default_chunk_size(n, h, v)
    dtype, acc, device = hidden.dtype, opmath_dtype(hidden.dtype), hidden.device
    check_targets(target, v, ignore_index)
    total, scale = reduction_scale(target, None, ignore_index, reduction, acc)
    scale = 1.0 if scale is None else float(scale)
    with_grad = grad_hidden or grad_weight or grad_bias
    row_losses = torch.empty((n,), dtype=acc, device=device)
    empty = hidden.new_empty((0,))
    gh = hidden.new_empty((n, h)) if grad_hidden else empty
    gw = torch.zeros((v, h), dtype=acc, device=device) if grad_weight else empty
    gb = torch.zeros((v,), dtype=acc, device=device) if grad_bias else empty
    weight_t = weight.t()
    for r0 in range(0, n, chunk_size):
        r1 = min(n, r0 + chunk_size)
        h_c = hidden[r0:r1]
        logits = torch.mm(h_c, weight_t) if bias is None else torch.addmm(bias, h_c, weight_t)
        # The chunk's logits are ours: the gradient overwrites them when it has their dtype.
        g = None if not with_grad else logits if dtype == acc else torch.empty((r1 - r0, v), dtype=acc, device=device)
        torch.ops.pyeff.cross_entropy_rows_cpu(logits, target[r0:r1], None, ignore_index, label_smoothing,
                                               scale, row_losses[r0:r1], g)
        if grad_hidden:
            torch.mm(g.to(dtype), weight, out=gh[r0:r1])
        if grad_weight:
            gw.addmm_(g.t(), h_c.to(acc))
        if grad_bias:
            gb += g.sum(0)
        del logits, g
    gw = gw.to(weight.dtype) if grad_weight else gw
    gb = gb.to(bias.dtype) if grad_bias else gb
    return reduce_rows(row_losses, reduction, total), gh, gw, gb  # mean of none: nan


@LINEAR_CROSS_ENTROPY.impl("triton")
def linear_cross_entropy_triton(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size,
                                grad_hidden, grad_weight, grad_bias):
    from pyeff.kernels.linear_cross_entropy import linear_cross_entropy as chunked

    acc = opmath_dtype(hidden.dtype)
    if hidden.device.type == "cpu":  # the interpreter; on a GPU the kernel marks a bad row NaN (no sync)
        check_targets(target, weight.shape[0], ignore_index)
    total, scale = reduction_scale(target, None, ignore_index, reduction, acc)
    rows, gh, gw, gb = chunked(hidden, weight, target, bias, ignore_index, label_smoothing, chunk_size or None,
                               grad_hidden, grad_weight, grad_bias, scale)
    return reduce_rows(rows, reduction, total), gh, gw, gb


@LINEAR_CROSS_ENTROPY.fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size, grad_hidden, grad_weight,
      grad_bias):
    empty = hidden.new_empty((0,))
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=opmath_dtype(hidden.dtype))
    gh = hidden.new_empty(hidden.shape) if grad_hidden else empty
    gw = weight.new_empty(weight.shape) if grad_weight else empty
    gb = bias.new_empty(bias.shape) if grad_bias else empty
    return loss, gh, gw, gb


def check_inputs(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, label_smoothing: float,
                 reduction: str, chunk_size: int | None, with_grad: bool) -> None:
    op = "pyeff.ops.linear_cross_entropy"
    if hidden.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise RuntimeError(f"{op}: expected float32, float64, bfloat16 or float16 hidden, got {hidden.dtype}")
    if hidden.dim() != 2:
        raise ValueError(f"Invalid hidden shape for {op}: {tuple(hidden.shape)}; expected (rows, hidden_size)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"Invalid weight shape for {op}: {tuple(weight.shape)}; expected (vocab, "
                         f"{hidden.shape[1]}) with vocab >= 1")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"Invalid bias shape for {op}: {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise RuntimeError(f"{op}: `{name}` is {t.dtype} on {t.device} but `hidden` {hidden.dtype} on "
                               f"{hidden.device}; pass them in one dtype, on one device")
    if target.dtype != torch.int64:
        raise RuntimeError(f"{op}: expected int64 target, got {target.dtype}")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"Invalid target shape for {op}: {tuple(target.shape)}; expected ({hidden.shape[0]},)")
    if target.device != hidden.device:
        raise RuntimeError(f"{op}: `target` is on {target.device} but `hidden` on {hidden.device}; move them to "
                           "one device")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"Invalid label_smoothing: {label_smoothing}; expected a value in [0, 1]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"Invalid reduction: {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Invalid chunk_size: {chunk_size}; expected a positive int (rows per chunk) or None")
    if reduction == "none" and with_grad:
        raise RuntimeError(f"{op}: gradients with `reduction='none'` would need each row's grad_output, unknown "
                           "during the forward; use reduction 'mean' or 'sum', or compute the logits and call "
                           "cross_entropy")


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean", chunk_size: int | None = None, *,
    grad_hidden: bool = True, grad_weight: bool = True, grad_bias: bool = True, backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) for a unit grad_output; a gradient not asked for
    (or grad_bias without a bias) is an empty tensor. `chunk_size`: logits per chunk, in rows (None:
    the backend's choice). See the module docstring."""
    grad_bias = grad_bias and bias is not None
    check_inputs(hidden, weight, target, bias, label_smoothing, reduction, chunk_size,
                 grad_hidden or grad_weight or grad_bias)
    with torch.no_grad():  # the op returns its gradients; its outputs join no graph
        return LINEAR_CROSS_ENTROPY(
            LINEAR_CROSS_ENTROPY.choose(hidden.device, backend), hidden, weight, target, bias, int(ignore_index),
            float(label_smoothing), reduction, int(chunk_size or 0), bool(grad_hidden), bool(grad_weight),
            bool(grad_bias))
