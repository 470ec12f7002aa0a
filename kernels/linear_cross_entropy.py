r"""linear_cross_entropy on the GPU (contract and reference: pyeff/ops/linear_cross_entropy.py): the
loss and the gradients of hidden, weight and bias without the (N, V) logits, in chunks of the
vocabulary.

NOTE [vocabulary chunks]
Chunks of rows (the CPU backend's loop) need a (V, H) accumulator for grad_weight across chunks:
fp32 for an fp32 sum, twice the size of a bf16 weight, more than everything else put together.
Chunks of the vocabulary finish each slice of grad_weight in one GEMM over all rows instead, so it
is written once, in the weight's dtype, with the GEMM's fp32 accumulation; the price is computing
each chunk's logits twice:

    pass 1, per chunk j:  z_j = h W_j^T (+ b_j)          (tensor-core GEMM in the input dtype)
                          partial max / sum of exp / smoothing sums / x_t of every row over z_j
    then:                 per-row lse and loss from the partials (kernels/cross_entropy.py)
    pass 2, per chunk j:  z_j again; g_j = dloss/dz_j over z_j in place (input dtype, as eager's)
                          grad_W[j] = g_j^T h (one GEMM, fp32 accumulation, rounded once)
                          grad_b[j] = column sums of g_j (fp32)
                          grad_h += g_j W_j (fp32 accumulator of N x H, rounded once at the end)

grad_h's per-chunk products come out of the GEMM in fp32 where torch has matmuls with an fp32 output
for bf16/fp16 inputs (aten::mm.dtype, torch >= 2.8 on CUDA); elsewhere each chunk's product is
rounded to the input dtype before it is added in fp32. Extra memory: one chunk of logits, the N x H
accumulator (and one chunk's N x H product) and the per-row partials. The chunk width is chosen for the device
(vocab_chunk): logits about half the size of `hidden`, but wide enough that a chunk's GEMM fills the
GPU. A `chunk_size` given in rows (the op's unit, see its contract) means a chunk holding as many
logits as that many rows would.
"""

from __future__ import annotations

import math

import torch
import triton

from .._dtypes import opmath_dtype
from .cross_entropy import (PARTIAL, programs_to_fill, row_gradients, row_losses_from_stats, row_stats,
                            smoothing_scalar, split_columns)

CHUNK_ALIGN = 256  # columns


def vocab_chunk(rows: int, hidden_size: int, vocab: int, device: torch.device) -> int:
    """Vocabulary entries per chunk: logits of about half `hidden`'s elements, but at least enough
    columns for the chunk's GEMM to give every SM four 128x128 tiles; a multiple of CHUNK_ALIGN."""
    rows = max(rows, 1)
    fill = math.ceil(programs_to_fill(device) * 128 * 128 / rows)
    cols = max(hidden_size // 2, fill, CHUNK_ALIGN)
    return min(vocab, triton.cdiv(cols, CHUNK_ALIGN) * CHUNK_ALIGN)


def _fp32_output_matmul(device: torch.device) -> bool:
    return device.type == "cuda" and "dtype" in torch.ops.aten.mm.overloads()


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in fp32/fp64 (NOTE [vocabulary chunks])."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _fp32_output_matmul(acc.device):
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:
        acc += torch.mm(a, b)


def linear_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing, chunk_size, grad_hidden,
                         grad_weight, grad_bias, grad_scale):
    """(per-row losses, grad_hidden, grad_weight, grad_bias) of the contract, the gradients times
    `grad_scale` (a 0-d tensor, read on the device; None: 1); gradients not asked for are empty.
    `chunk_size`: chunks hold as many logits as that many rows (None: vocab_chunk)."""
    n, h = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    acc = opmath_dtype(hidden.dtype)
    chunk = vocab_chunk(n, h, v, device) if chunk_size is None else math.ceil(chunk_size * v / max(n, 1))
    starts = range(0, v, chunk)
    slots = [split_columns(n, min(chunk, v - v0), device)[0] for v0 in starts]
    partial = torch.empty((n, sum(slots), PARTIAL), dtype=acc, device=device)
    weight_t = weight.t()

    def logits_of(v0):
        w_t = weight_t[:, v0:v0 + chunk]
        return torch.mm(hidden, w_t) if bias is None else torch.addmm(bias[v0:v0 + chunk], hidden, w_t)

    eps = smoothing_scalar(label_smoothing, acc, device)
    p0 = 0
    for v0, programs in zip(starts, slots):
        row_stats(logits_of(v0), v0, target, None, ignore_index, eps, v, partial, p0, programs)
        p0 += programs
    row_losses = torch.empty((n,), dtype=acc, device=device)
    stats = row_losses_from_stats(partial, target, None, ignore_index, eps, v, row_losses, hidden.dtype)
    del partial
    empty = hidden.new_empty((0,))
    gh_acc = torch.zeros((n, h), dtype=acc, device=device) if grad_hidden else None
    gw = torch.empty_like(weight) if grad_weight else empty
    gb = torch.empty_like(bias) if grad_bias else empty
    if grad_hidden or grad_weight or grad_bias:
        for v0, programs in zip(starts, slots):
            g = logits_of(v0)
            row_gradients(g, g, v0, target, None, ignore_index, eps, v, stats, grad_scale, programs)
            if grad_weight:
                torch.mm(g.t(), hidden, out=gw[v0:v0 + chunk])
            if grad_bias:
                gb[v0:v0 + chunk] = g.sum(0, dtype=acc)
            if grad_hidden:
                _accumulate_product(gh_acc, g, weight[v0:v0 + chunk])
            del g
    gh = gh_acc.to(hidden.dtype) if grad_hidden else empty
    return row_losses, gh, gw, gb
