"""Triton kernels for bias + GELU and SwiGLU (contracts: pyeff/ops/activation.py).

Every kernel works on (BLOCK_M, BLOCK_N) tiles of a (rows, n) array, math in fp32 (fp64 for fp64):

    bias_gelu:  h = x + bias,  y = gelu(h),  dx = dy * gelu'(h),  dbias = sum over rows of dx
    swiglu:     s = sigmoid(gate),  y = gate * s * up,
                dgate = dy * up * s * (1 + gate * (1 - s)),  dup = dy * gate * s

dbias is reduced in two stages: each row tile writes its column sums to a partial row, and the
partial rows are added in tile order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dtypes import opmath_dtype
from ._layout import rows as _rows
from ._rounding import cast_rne, tl_opmath


@triton.jit
def _tanh(u):
    # tanh(|u|) = (1 - e) / (1 + e) with e = exp(-2|u|) <= 1: no overflow, exact limit 1.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


# Constants written out: sqrt(1/2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327,
# sqrt(2/pi) = 0.7978845608028654, and the tanh form's 0.044715.
@triton.jit
def _gelu(h, TANH: tl.constexpr):
    if TANH:
        y = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    else:
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return y


@triton.jit
def _gelu_derivative(h, TANH: tl.constexpr):
    if TANH:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
    else:
        d = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    return d


@triton.jit
def _sigmoid(g):
    # 1 / (1 + exp(-g)) written with exp(-|g|) <= 1, so that nothing overflows.
    e = tl.exp(-tl.abs(g))
    return tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tile(rows, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    c = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    return r, c, (r < rows) & (c < n)


@triton.jit
def _bias_gelu_forward_kernel(
    X,  # (rows, n) input, before the bias, row stride stride_x
    Bias,  # (n,) read when HAS_BIAS
    Y,  # (rows, n) gelu(x + bias), contiguous
    rows,
    n,
    stride_x,
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,  # approximate='tanh'
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for fp64 input
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r, c, mask = _tile(rows, n, BLOCK_M, BLOCK_N)
    h = tl.load(X + r * stride_x + c, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        h = h + tl.load(Bias + c, mask=c < n, other=0.0).to(ACC)
    tl.store(Y + r * n + c, cast_rne(_gelu(h, TANH), Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward_kernel(
    DY,  # (rows, n) gradient of y, row stride stride_dy
    X,  # (rows, n) the forward's input, row stride stride_x
    Bias,  # (n,) read when HAS_BIAS
    DX,  # (rows, n) dy * gelu'(x + bias), contiguous
    DBp,  # (row tiles, n) column sums of dx per row tile, written when BIAS_GRAD
    rows,
    n,
    stride_dy,
    stride_x,
    HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    TANH: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r, c, mask = _tile(rows, n, BLOCK_M, BLOCK_N)
    h = tl.load(X + r * stride_x + c, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        h = h + tl.load(Bias + c, mask=c < n, other=0.0).to(ACC)
    dx = tl.load(DY + r * stride_dy + c, mask=mask, other=0.0).to(ACC) * _gelu_derivative(h, TANH)
    tl.store(DX + r * n + c, cast_rne(dx, DX.dtype.element_ty), mask=mask)
    if BIAS_GRAD:
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(DBp + tl.program_id(0).to(tl.int64) * n + cols, tl.sum(dx, axis=0), mask=cols < n)


@triton.jit
def _swiglu_forward_kernel(
    Gate,  # (rows, n), row stride stride_gate
    Up,  # (rows, n), row stride stride_up
    Y,  # (rows, n) contiguous: silu(gate) * up
    rows,
    n,
    stride_gate,
    stride_up,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r, c, mask = _tile(rows, n, BLOCK_M, BLOCK_N)
    g = tl.load(Gate + r * stride_gate + c, mask=mask, other=0.0).to(ACC)
    u = tl.load(Up + r * stride_up + c, mask=mask, other=0.0).to(ACC)
    s = _sigmoid(g)
    tl.store(Y + r * n + c, cast_rne(g * s * u, Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    DY,  # (rows, n), row stride stride_dy
    Gate,  # (rows, n), row stride stride_gate
    Up,  # (rows, n), row stride stride_up
    DGate,  # (rows, n), row stride stride_grad
    DUp,  # (rows, n), row stride stride_grad
    rows,
    n,
    stride_dy,
    stride_gate,
    stride_up,
    stride_grad,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r, c, mask = _tile(rows, n, BLOCK_M, BLOCK_N)
    g = tl.load(Gate + r * stride_gate + c, mask=mask, other=0.0).to(ACC)
    u = tl.load(Up + r * stride_up + c, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + r * stride_dy + c, mask=mask, other=0.0).to(ACC)
    s = _sigmoid(g)
    tl.store(DUp + r * stride_grad + c, cast_rne(dy * g * s, DUp.dtype.element_ty), mask=mask)
    tl.store(DGate + r * stride_grad + c, cast_rne(dy * u * s * (1.0 + g * (1.0 - s)), DGate.dtype.element_ty),
             mask=mask)


def _blocks(n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): tiles of about 4096 elements, as wide as the rows allow up to 256."""
    block_n = min(256, triton.next_power_of_2(max(n, 1)))
    return max(1, 4096 // block_n), block_n


def _grid(rows: int, n: int, block_m: int, block_n: int) -> tuple[int, int]:
    return triton.cdiv(rows, block_m), triton.cdiv(n, block_n)


def bias_gelu_forward(x, bias, approximate):
    x, bias = _rows(x), bias.contiguous() if bias is not None else None
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows and n:
        bm, bn = _blocks(n)
        _bias_gelu_forward_kernel[_grid(rows, n, bm, bn)](
            x, bias if bias is not None else x, y, rows, n, x.stride(0), HAS_BIAS=bias is not None,
            TANH=approximate == "tanh", ACC=tl_opmath(x.dtype), BLOCK_M=bm, BLOCK_N=bn)
    return y


def bias_gelu_backward(dy, x, bias, approximate, bias_grad):
    dy, x, bias = _rows(dy), _rows(x), bias.contiguous() if bias is not None else None
    rows, n = x.shape
    bias_dtype = bias.dtype if bias is not None else x.dtype
    dx = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    bm, bn = _blocks(n)
    grid = _grid(rows, n, bm, bn)
    acc = opmath_dtype(x.dtype)
    partial = torch.zeros((grid[0], n) if bias_grad else (0, 0), dtype=acc, device=x.device)
    if rows and n:
        _bias_gelu_backward_kernel[grid](
            dy, x, bias if bias is not None else x, dx, partial if bias_grad else dx, rows, n, dy.stride(0),
            x.stride(0), HAS_BIAS=bias is not None, BIAS_GRAD=bias_grad, TANH=approximate == "tanh",
            ACC=tl_opmath(x.dtype), BLOCK_M=bm, BLOCK_N=bn)
    # Second stage: the row tiles' column sums added in a fixed order.
    dbias = partial.sum(0).to(bias_dtype) if bias_grad else x.new_empty(0, dtype=bias_dtype)
    return dx, dbias


def _swiglu_views(gate, up):
    """(gate, up, n) as two (rows, n) views; without `up`, the halves of the packed `gate`."""
    gate, up = _rows(gate), _rows(up)
    if up is not None:
        return gate, up, gate.shape[1]
    n = gate.shape[1] // 2
    return gate[:, :n], gate[:, n:], n


def swiglu_forward(gate, up):
    g, u, n = _swiglu_views(gate, up)
    rows = g.shape[0]
    y = gate.new_empty(rows, n)
    if rows and n:
        bm, bn = _blocks(n)
        _swiglu_forward_kernel[_grid(rows, n, bm, bn)](
            g, u, y, rows, n, g.stride(0), u.stride(0), ACC=tl_opmath(gate.dtype), BLOCK_M=bm, BLOCK_N=bn)
    return y


def swiglu_backward(dy, gate, up):
    dy = _rows(dy)
    g, u, n = _swiglu_views(gate, up)
    rows = g.shape[0]
    dgrad = gate.new_empty(rows, 2 * n)
    if rows and n:
        bm, bn = _blocks(n)
        _swiglu_backward_kernel[_grid(rows, n, bm, bn)](
            dy, g, u, dgrad[:, :n], dgrad[:, n:], rows, n, dy.stride(0), g.stride(0), u.stride(0), dgrad.stride(0),
            ACC=tl_opmath(gate.dtype), BLOCK_M=bm, BLOCK_N=bn)
    return dgrad
