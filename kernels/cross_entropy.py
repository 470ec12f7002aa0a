r"""Triton kernels for softmax cross-entropy over rows: the loss and its gradient (contract and
reference: pyeff/ops/cross_entropy.py), and the in-place scaling of a saved gradient by grad_output.

Per row x with target t, class weights w (1 without them, W = sum_c w_c), smoothing eps:

    stats (online, per lane):  m <- max(m, x),  s <- s exp(m_old - m) + exp(x - m),
                               z <- z + w x,  W <- W + w               (label smoothing only)
    lse = m + log s
    loss = (1 - eps) w_t (lse - x_t) + eps / C (W lse - z)
    grad:  g_c = scale (exp(x_c - lse) ((1 - eps) w_t + eps W / C) - eps / C w_c - (1 - eps) w_t [c = t])

A row whose target is ignore_index gets loss 0 and scale 0 (its gradient is 0, NaN where its
logits are, as torch's). A target outside [0, C) cannot raise without a host sync: its row's loss
and gradient are NaN. Rows are one program each when they fill the GPU; otherwise each row's
columns are split over several programs: partial (m, s, z, W, x_t) per program, combined in a fixed
order by a second kernel that writes the loss and lse, then a third writes the gradient. The same
three pieces serve linear_cross_entropy's vocabulary chunks (kernels/linear_cross_entropy.py). The
gradient may be written over the logits (G is X): each block is read before it is written, by the
same program.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._layout import rows as _rows
from ._rounding import cast_rne, tl_opmath

PARTIAL = 5  # m, s, z, W, x_t per (row, program)
MAX_BLOCK = 4096


@triton.jit
def _target(Target, row, stride_t, C, ignore_index):
    """(t clamped to a class, valid: not ignored, bad: out of range) of a row."""
    t = tl.load(Target + row * stride_t)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= C))
    return tl.where(valid & ~bad, t, 0), valid, bad


@triton.jit
def _sweep_stats(X, W, col0, start, end, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr):
    """(m, s, z, W) over columns [start, end) of the row at X (class col0 + c for column c)."""
    cols = tl.arange(0, BLOCK)
    m_i = tl.full([BLOCK], float("-inf"), ACC)
    s_i = tl.zeros([BLOCK], ACC)
    z_i = tl.zeros([BLOCK], ACC)
    w_i = tl.zeros([BLOCK], ACC)
    for c0 in range(start, end, BLOCK):
        offs = c0 + cols
        mask = offs < end
        x = tl.load(X + offs, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m_i, x)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that have only seen -inf
        s_i = s_i * tl.exp(m_i - m_ref) + tl.exp(x - m_ref)
        m_i = m_new
        if SMOOTH:
            x = tl.where(mask, x, 0.0)  # padding lanes hold -inf
            if HAS_WEIGHT:
                w = tl.load(W + col0 + offs, mask=mask, other=0.0)
                z_i += w * x
                w_i += w
            else:
                z_i += x
    m = tl.max(m_i, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.sum(s_i * tl.exp(m_i - m_ref), 0), tl.sum(z_i, 0), tl.sum(w_i, 0)


@triton.jit
def _row_loss(lse, x_t, w_t, z, weight_sum, C, eps, valid, bad, SMOOTH: tl.constexpr):
    loss = (1.0 - eps) * w_t * (lse - x_t)
    if SMOOTH:
        loss += eps / C * (weight_sum * lse - z)
    return tl.where(bad, float("nan"), tl.where(valid, loss, 0.0))


@triton.jit
def _sweep_grad(X, G, W, col0, start, end, t, lse, w_t, weight_sum, scale, C, eps, bad,
                HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The gradient over columns [start, end) of the row at X into G."""
    cols = tl.arange(0, BLOCK)
    coef_p = scale * ((1.0 - eps) * w_t + eps * weight_sum / C)
    coef_w = scale * eps / C
    coef_t = scale * (1.0 - eps) * w_t
    for c0 in range(start, end, BLOCK):
        offs = c0 + cols
        mask = offs < end
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        g = tl.exp(x - lse) * coef_p
        if SMOOTH:
            if HAS_WEIGHT:
                g -= coef_w * tl.load(W + col0 + offs, mask=mask, other=0.0)
            else:
                g -= coef_w
        g = tl.where(col0 + offs == t, g - coef_t, g)
        g = tl.where(bad, float("nan"), g)
        tl.store(G + offs, cast_rne(g, G.dtype.element_ty), mask=mask)


@triton.jit
def _smoothing(Eps, SMOOTH: tl.constexpr):
    # a scalar in the ACC dtype: a float argument would be fp32, too coarse for fp64 logits
    if SMOOTH:
        eps = tl.load(Eps)
    else:
        eps = 0.0
    return eps


@triton.jit
def _scale_of(Scale, valid, HAS_SCALE: tl.constexpr):
    # an ignored row's scale is 0, whatever the scale (inf for a 'mean' over no rows)
    if HAS_SCALE:
        scale = tl.load(Scale)
    else:
        scale = 1.0
    return tl.where(valid, scale, 0.0)


@triton.jit
def _rows_kernel(
    X,  # logits, rows x C, columns contiguous
    stride_x,  # elements between rows of X
    Target,  # int64 targets, one per row
    stride_t,  # elements between targets
    W,  # class weights (C,) in the ACC dtype; not read without HAS_WEIGHT
    Loss,  # per-row losses (rows,) in the ACC dtype
    G,  # gradient, rows x C, columns contiguous; may be X; not written without HAS_GRAD
    stride_g,  # elements between rows of G
    Scale,  # the gradient's factor, a scalar in the ACC dtype; read when HAS_SCALE, else 1
    C,  # number of classes
    ignore_index,
    Eps,  # label smoothing, a scalar in the ACC dtype; read when SMOOTH
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for fp64 logits
    BLOCK: tl.constexpr,
):
    """One program per row: stats, loss and gradient in two sweeps over the row."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    G += row * stride_g
    t, valid, bad = _target(Target, row, stride_t, C, ignore_index)
    eps = _smoothing(Eps, SMOOTH)
    m, s, z, weight_sum = _sweep_stats(X, W, 0, 0, C, HAS_WEIGHT, SMOOTH, ACC, BLOCK)
    lse = m + tl.log(s)
    if HAS_WEIGHT:
        w_t = tl.load(W + t)
    else:
        w_t = 1.0
        weight_sum = C * 1.0
    x_t = tl.load(X + t).to(ACC)
    tl.store(Loss + row, _row_loss(lse, x_t, w_t, z, weight_sum, C, eps, valid, bad, SMOOTH))
    if HAS_GRAD:
        scale = _scale_of(Scale, valid, HAS_SCALE)
        _sweep_grad(X, G, W, 0, 0, C, t, lse, w_t, weight_sum, scale, C, eps, bad, HAS_WEIGHT, SMOOTH, ACC, BLOCK)


@triton.jit
def _stats_kernel(
    X,  # logits of columns [col0, col0 + C_local) of every row, columns contiguous
    stride_x,
    C_local,  # columns of X
    col0,  # the class of X's first column
    cols_per_program,  # a multiple of BLOCK
    Target,
    stride_t,
    W,  # class weights (C,), read when HAS_WEIGHT and SMOOTH
    Partial,  # (rows, P, PARTIAL) in the ACC dtype: m, s, z, W, x_t per program
    P,  # partial slots per row
    p0,  # this launch's first slot
    C,  # classes in all
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, j): the partial statistics of columns [j, j + 1) * cols_per_program."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    start = j * cols_per_program
    end = tl.minimum(start + cols_per_program, C_local)
    X += row * stride_x
    t, valid, bad = _target(Target, row, stride_t, C, ignore_index)
    m, s, z, weight_sum = _sweep_stats(X, W, col0, start, end, HAS_WEIGHT, SMOOTH, ACC, BLOCK)
    local = t - col0
    mine = valid & ~bad & (local >= start) & (local < end)
    x_t = tl.load(X + tl.where(mine, local, start), mask=mine, other=0.0).to(ACC)
    out = Partial + (row * P + p0 + j) * 5
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, z)
    tl.store(out + 3, weight_sum)
    tl.store(out + 4, x_t)


@triton.jit
def _loss_kernel(
    Partial,  # (rows, P, PARTIAL) from _stats_kernel
    P,
    Target,
    stride_t,
    W,  # class weights, read when HAS_WEIGHT
    Loss,  # (rows,) in the ACC dtype
    Stats,  # (rows, 2): lse and W, for _grad_kernel
    C,
    ignore_index,
    Eps,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    ACC: tl.constexpr,
    P_BLOCK: tl.constexpr,  # power of two >= P
):
    """One program per row: its partials combined in slot order, the loss and lse."""
    row = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, P_BLOCK)
    mask = slots < P
    part = Partial + (row * P + slots) * 5
    m_j = tl.load(part, mask=mask, other=float("-inf"))
    m = tl.max(m_j, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    lse = m + tl.log(tl.sum(tl.load(part + 1, mask=mask, other=0.0) * tl.exp(m_j - m_ref), 0))
    z = tl.sum(tl.load(part + 2, mask=mask, other=0.0), 0)
    x_t = tl.sum(tl.load(part + 4, mask=mask, other=0.0), 0)
    t, valid, bad = _target(Target, row, stride_t, C, ignore_index)
    if HAS_WEIGHT:
        w_t = tl.load(W + t)
        weight_sum = tl.sum(tl.load(part + 3, mask=mask, other=0.0), 0)
    else:
        w_t = 1.0
        weight_sum = C * 1.0
    eps = _smoothing(Eps, SMOOTH)
    tl.store(Loss + row, _row_loss(lse, x_t, w_t, z, weight_sum, C, eps, valid, bad, SMOOTH))
    tl.store(Stats + row * 2, lse)
    tl.store(Stats + row * 2 + 1, weight_sum)


@triton.jit
def _grad_kernel(
    X,  # logits of columns [col0, col0 + C_local), columns contiguous
    stride_x,
    G,  # their gradient, columns contiguous; may be X
    stride_g,
    C_local,
    col0,
    cols_per_program,
    Target,
    stride_t,
    W,
    Stats,  # (rows, 2) from _loss_kernel
    Scale,
    C,
    ignore_index,
    Eps,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, j): the gradient of columns [j, j + 1) * cols_per_program."""
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * cols_per_program
    end = tl.minimum(start + cols_per_program, C_local)
    t, valid, bad = _target(Target, row, stride_t, C, ignore_index)
    if HAS_WEIGHT:
        w_t = tl.load(W + t)
    else:
        w_t = 1.0
    scale = _scale_of(Scale, valid, HAS_SCALE)
    _sweep_grad(X + row * stride_x, G + row * stride_g, W, col0, start, end, t, tl.load(Stats + row * 2),
                w_t, tl.load(Stats + row * 2 + 1), scale, C, _smoothing(Eps, SMOOTH), bad, HAS_WEIGHT, SMOOTH, ACC,
                BLOCK)


@triton.jit
def _rescale_kernel(
    G,  # a saved gradient, contiguous, n elements, rescaled in place
    n,
    GradOutput,  # the backward's grad_output, a scalar
    Applied,  # float32 scalar: the factor G holds already
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """G *= grad_output / applied; nothing is read or written when they are equal."""
    go = tl.load(GradOutput).to(ACC)
    applied = tl.load(Applied).to(ACC)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < n) & ((tl.zeros([BLOCK], ACC) + go) != applied)  # a vector: the interpreter wants one
    g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
    tl.store(G + offs, cast_rne(g * (go / applied), G.dtype.element_ty), mask=mask)


def _block(columns: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for sweeps over `columns`."""
    block = min(triton.next_power_of_2(max(columns, 1)), MAX_BLOCK)
    return block, 4 if block <= 1024 else 8 if block <= 2048 else 16


@functools.cache
def programs_to_fill(device: torch.device) -> int:
    """Programs that keep every SM busy (4 per SM); 1 off the GPU (the interpreter: no split)."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def split_columns(rows: int, columns: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(programs per row, columns per program): rows split when there are too few to fill the GPU,
    each program keeping at least two blocks of columns."""
    block, _ = _block(columns)
    if splits is None:
        most = max(1, columns // (2 * block))
        splits = min(most, triton.cdiv(programs_to_fill(device), max(rows, 1)))
    per_program = triton.cdiv(triton.cdiv(columns, max(1, splits)), block) * block
    return triton.cdiv(columns, per_program), per_program


def _flags(weight, eps, logits_dtype):
    return dict(HAS_WEIGHT=weight is not None, SMOOTH=eps is not None, ACC=tl_opmath(logits_dtype))


def smoothing_scalar(label_smoothing: float, acc: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Label smoothing as the kernels read it: a scalar filled on the device (no host-to-device
    copy; a float argument would be fp32), or None without smoothing."""
    return torch.full((), label_smoothing, dtype=acc, device=device) if label_smoothing > 0 else None


def row_stats(logits, col0, target, weight, ignore_index, eps, classes, partial, p0, splits):
    """Partial statistics of logits (rows, C_local) = classes [col0, col0 + C_local) into
    partial[:, p0 : p0 + programs] (programs = split_columns(...)[0] for `splits`)."""
    rows, local = logits.shape
    programs, per_program = split_columns(rows, local, logits.device, splits)
    block, warps = _block(per_program)
    _stats_kernel[(rows, programs)](
        logits, logits.stride(0), local, col0, per_program, target, target.stride(0),
        weight if weight is not None else partial, partial, partial.shape[1], p0, classes, ignore_index,
        BLOCK=block, num_warps=warps, **_flags(weight, eps, logits.dtype))


def row_losses_from_stats(partial, target, weight, ignore_index, eps, classes, row_losses, logits_dtype):
    """Losses into row_losses from the partials; returns the (rows, 2) lse and weight sums."""
    rows, slots, _ = partial.shape
    stats = partial.new_empty((rows, 2))
    _loss_kernel[(rows,)](
        partial, slots, target, target.stride(0), weight if weight is not None else partial, row_losses, stats,
        classes, ignore_index, eps if eps is not None else stats, P_BLOCK=triton.next_power_of_2(slots),
        **_flags(weight, eps, logits_dtype))
    return stats


def row_gradients(logits, grad, col0, target, weight, ignore_index, eps, classes, stats, grad_scale, splits):
    """The gradient of logits (rows, C_local) = classes [col0, col0 + C_local) into grad (may be logits)."""
    rows, local = logits.shape
    programs, per_program = split_columns(rows, local, logits.device, splits)
    block, warps = _block(per_program)
    _grad_kernel[(rows, programs)](
        logits, logits.stride(0), grad, grad.stride(0), local, col0, per_program, target, target.stride(0),
        weight if weight is not None else stats, stats, grad_scale if grad_scale is not None else stats, classes,
        ignore_index, eps if eps is not None else stats, HAS_SCALE=grad_scale is not None, BLOCK=block,
        num_warps=warps, **_flags(weight, eps, logits.dtype))


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                       label_smoothing: float, grad_scale: torch.Tensor | None, row_losses: torch.Tensor,
                       grad: torch.Tensor | None, splits: int | None = None) -> None:
    """Per-row losses into `row_losses` (opmath dtype) and, when `grad` is given, the gradient times
    `grad_scale` (a 0-d tensor on the logits' device, read there: no host sync; None: 1) into it
    (columns contiguous; may be `logits` itself). Any row and target strides; `splits` forces the
    programs per row (default: split_columns)."""
    rows, classes = logits.shape
    if rows == 0:
        return
    logits = _rows(logits)
    acc = row_losses.dtype
    if weight is not None:
        weight = weight.to(acc).contiguous()
    if grad_scale is not None:
        grad_scale = grad_scale.to(acc).reshape(())
    eps = smoothing_scalar(label_smoothing, acc, logits.device)
    programs, _ = split_columns(rows, classes, logits.device, splits)
    if programs > 1:
        partial = torch.empty((rows, programs, PARTIAL), dtype=acc, device=logits.device)
        row_stats(logits, 0, target, weight, ignore_index, eps, classes, partial, 0, programs)
        stats = row_losses_from_stats(partial, target, weight, ignore_index, eps, classes, row_losses, logits.dtype)
        if grad is not None:
            row_gradients(logits, grad, 0, target, weight, ignore_index, eps, classes, stats, grad_scale, programs)
        return
    block, warps = _block(classes)
    _rows_kernel[(rows,)](
        logits, logits.stride(0), target, target.stride(0), weight if weight is not None else row_losses, row_losses,
        grad if grad is not None else logits, grad.stride(0) if grad is not None else 0,
        grad_scale if grad_scale is not None else row_losses, classes, ignore_index,
        eps if eps is not None else row_losses, HAS_GRAD=grad is not None, HAS_SCALE=grad_scale is not None,
        BLOCK=block, num_warps=warps, **_flags(weight, eps, logits.dtype))


def rescale_(grads: list[torch.Tensor], grad_output: torch.Tensor, applied: torch.Tensor) -> None:
    """Each contiguous gradient in `grads`, which holds the factor `applied` (a float32 scalar on the
    device), becomes the gradient for `grad_output` (a scalar); `applied` then holds grad_output. Decided
    on the device: with grad_output equal to `applied` (1 after the forward), no gradient is touched."""
    block = 4096
    for g in grads:
        if g.numel():
            _rescale_kernel[(triton.cdiv(g.numel(), block),)](g, g.numel(), grad_output, applied,
                                                                 ACC=tl_opmath(g.dtype), BLOCK=block)
    applied.copy_(grad_output.reshape(()))
