"""Triton kernels for LayerNorm / RMSNorm with an optional fused residual add (contract:
pyeff/ops/norm.py).

Forward: one program per row, the whole row in registers (n up to MAX_COLS):

    h = x + residual (stored, rounded)    mean = sum(h) / n          (LayerNorm)
    rstd = 1 / sqrt(sum((h - mean)^2) / n + eps)    (RMSNorm: sum(h^2) / n + eps)
    y = (h - mean) * rstd * w + b

Backward: each program takes a contiguous block of rows and keeps the sums of dy * xhat and dy
over them in registers; the per-program partials are then added in program order (two stages,
deterministic, no atomics). With xhat = (h - mean) * rstd and g = dy * w:

    dx = rstd * (g - (mean(g) + xhat * mean(g * xhat))) + dh
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dtypes import opmath_dtype
from ._layout import rows as _rows
from ._rounding import cast_rne, tl_opmath

MAX_COLS = 65536  # a row must fit in one program's registers
MAX_PROGRAMS = 256  # backward programs, so partials are at most MAX_PROGRAMS x n


@triton.jit
def _norm_forward_kernel(
    X,  # (rows, n) input, row stride stride_x
    R,  # (rows, n) residual, row stride stride_r, read when HAS_RESIDUAL
    W,  # (n,) weight, read when HAS_WEIGHT
    B,  # (n,) bias, read when HAS_BIAS
    Y,  # (rows, n) output, contiguous
    H,  # (rows, n) x + residual, contiguous, written when HAS_RESIDUAL
    Mean,  # (rows,) row means, written unless RMS
    Rstd,  # (rows,) 1 / sqrt(var + eps)
    n,  # columns
    stride_x,
    stride_r,
    eps,  # added to the variance (mean square for RMS)
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for fp64 input
    BLOCK_N: tl.constexpr,  # power of two >= n
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n
    offs = row * n + cols

    # ---- h = x (+ residual, rounded to the stored dtype)
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        h_stored = cast_rne(h + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(ACC), H.dtype.element_ty)
        tl.store(H + offs, h_stored, mask=mask)
        h = h_stored.to(ACC)

    # ---- statistics
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n + eps)
        xhat = h * rstd
    else:
        mean = tl.sum(h, axis=0) / n
        centred = tl.where(mask, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n + eps)
        tl.store(Mean + row, mean)
        xhat = centred * rstd
    tl.store(Rstd + row, rstd)

    # ---- y = xhat * w + b
    y = xhat
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, cast_rne(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(
    DY,  # (rows, n) gradient of y, row stride stride_dy
    DH,  # (rows, n) gradient reaching the returned h directly, row stride stride_dh, read when HAS_DH
    H,  # (rows, n) what was normalized, row stride stride_h
    W,  # (n,) weight, read when HAS_WEIGHT
    Mean,  # (rows,) read unless RMS
    Rstd,  # (rows,)
    DX,  # (rows, n) gradient of h, contiguous
    DWp,  # (programs, n) partial sums of dy * xhat, written when PARAM_GRADS
    DBp,  # (programs, n) partial sums of dy, written when PARAM_GRADS
    rows,
    n,
    stride_dy,
    stride_dh,
    stride_h,
    rows_per_program,
    HAS_DH: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    PARAM_GRADS: tl.constexpr,
    RMS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for row in range(row_start, row_end):
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(Rstd + row)
        if RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(mask, h - tl.load(Mean + row), 0.0) * rstd
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        # ---- dx = rstd * (g - (mean(g) + xhat * mean(g * xhat))) (+ dh)
        c2 = tl.sum(g * xhat, axis=0) / n
        if RMS:
            dx = rstd * (g - xhat * c2)
        else:
            c1 = tl.sum(g, axis=0) / n
            dx = rstd * (g - (c1 + xhat * c2))
        if HAS_DH:
            dx = dx + tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(ACC)
        tl.store(DX + row * n + cols, cast_rne(dx, DX.dtype.element_ty), mask=mask)
        if PARAM_GRADS:
            dw += dy * xhat
            db += dy
    if PARAM_GRADS:
        tl.store(DWp + pid * n + cols, dw, mask=mask)
        tl.store(DBp + pid * n + cols, db, mask=mask)


def _block_n(n: int) -> int:
    if n > MAX_COLS:
        raise RuntimeError(f"pyeff.kernels.norm: the triton backend normalizes rows of up to {MAX_COLS} elements, "
                           f"got {n}; use `backend='reference'` (or the cpu backend on the CPU) for longer rows")
    return triton.next_power_of_2(max(n, 1))


def _num_warps(block_n: int) -> int:
    return min(16, max(1, block_n // 256))


def _contiguous(t):
    return t.contiguous() if t is not None else None


def norm_forward(x, residual, weight, bias, eps, rms):
    x, residual, weight, bias = _rows(x), _rows(residual), _contiguous(weight), _contiguous(bias)
    rows, n = x.shape
    stats = torch.empty(rows, dtype=opmath_dtype(x.dtype), device=x.device)
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else x.new_empty(0)
    mean = stats.new_empty(0) if rms else torch.empty_like(stats)
    if rows == 0 or n == 0:
        return y, h, mean.fill_(float("nan")), stats.fill_(float("nan"))
    block_n = _block_n(n)
    _norm_forward_kernel[(rows,)](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, h if residual is not None else y, stats if rms else mean, stats, n,
        x.stride(0), residual.stride(0) if residual is not None else 0, eps, HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RMS=rms, ACC=tl_opmath(x.dtype), BLOCK_N=block_n,
        num_warps=_num_warps(block_n))
    return y, h, mean, stats


def norm_backward(dy, dh, h, weight, mean, rstd, rms, weight_grad, bias_grad):
    dy, dh, h, weight = _rows(dy), _rows(dh), _rows(h), _contiguous(weight)
    mean, rstd = _contiguous(mean), _contiguous(rstd)
    rows, n = h.shape
    acc = opmath_dtype(h.dtype)
    param_dtype = weight.dtype if weight is not None else acc
    dx = torch.empty((rows, n), dtype=h.dtype, device=h.device)
    param_grads = weight_grad or bias_grad
    programs = max(1, min(rows, MAX_PROGRAMS))
    partial = torch.empty((2, programs, n) if param_grads else (2, 0, 0), dtype=acc, device=h.device)
    if rows > 0 and n > 0:
        block_n = _block_n(n)
        rows_per_program = triton.cdiv(rows, programs)
        programs = triton.cdiv(rows, rows_per_program)
        # Without parameter gradients the partial pointers are never written: any tensor will do.
        dwp, dbp = (partial[0, :programs], partial[1, :programs]) if param_grads else (dx, dx)
        _norm_backward_kernel[(programs,)](
            dy, dh if dh is not None else dy, h, weight if weight is not None else h, mean if not rms else rstd,
            rstd, dx, dwp, dbp, rows, n, dy.stride(0), dh.stride(0) if dh is not None else 0, h.stride(0),
            rows_per_program, HAS_DH=dh is not None,
            HAS_WEIGHT=weight is not None, PARAM_GRADS=param_grads, RMS=rms, ACC=tl_opmath(h.dtype), BLOCK_N=block_n,
            num_warps=_num_warps(block_n))
    elif param_grads:
        partial.zero_()
    # Second stage: the programs' partial sums added in a fixed order.
    partial = partial[:, :programs]
    dweight = partial[0].sum(0).to(param_dtype) if weight_grad else h.new_empty(0, dtype=param_dtype)
    dbias = partial[1].sum(0).to(param_dtype) if bias_grad else h.new_empty(0, dtype=param_dtype)
    return dx, dweight, dbias
