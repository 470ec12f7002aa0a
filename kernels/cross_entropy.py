r"""Triton kernel for softmax cross-entropy over rows, the loss and its gradient in one program per
row (contract and reference: pyeff/ops/cross_entropy.py).

Per row x with target t, class weights w (1 without them, W = sum_c w_c), smoothing eps:

    sweep 1 (online, per lane):  m <- max(m, x),  s <- s exp(m_old - m) + exp(x - m),
                                 z <- z + w x                         (label smoothing only)
    lse = m + log s
    loss = (1 - eps) w_t (lse - x_t) + eps / C (W lse - z)
    sweep 2:  g_c = scale (exp(x_c - lse) ((1 - eps) w_t + eps W / C) - eps / C w_c - (1 - eps) w_t [c = t])

A row whose target is ignore_index gets loss 0 and a zero gradient. The gradient may be written
over the logits (G is X): each block is read before it is written, by the same program.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows_kernel(
    X,  # logits, rows x C, columns contiguous
    stride_x,  # elements between rows of X
    Target,  # int64 targets, one per row, each ignore_index or in [0, C)
    W,  # class weights (C,) in the ACC dtype; not read without HAS_WEIGHT
    Loss,  # per-row losses (rows,) in the ACC dtype
    G,  # gradient, rows x C, columns contiguous; may be X; not written without HAS_GRAD
    stride_g,  # elements between rows of G
    C,  # number of classes
    ignore_index,
    Params,  # [label smoothing eps, W, the gradient's factor] in the ACC dtype
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for fp64 logits
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    G += row * stride_g
    eps = tl.load(Params)
    weight_sum = tl.load(Params + 1)
    t = tl.load(Target + row)
    valid = t != ignore_index
    t = tl.where(valid, t, 0)
    cols = tl.arange(0, BLOCK_SIZE)

    # ---- sweep 1: per-lane online max and sum of exponentials
    m_i = tl.full([BLOCK_SIZE], float("-inf"), ACC)
    s_i = tl.zeros([BLOCK_SIZE], ACC)
    z_i = tl.zeros([BLOCK_SIZE], ACC)
    for c0 in range(0, C, BLOCK_SIZE):
        offs = c0 + cols
        mask = offs < C
        x = tl.load(X + offs, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m_i, x)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that have only seen -inf
        s_i = s_i * tl.exp(m_i - m_ref) + tl.exp(x - m_ref)
        m_i = m_new
        if SMOOTH:
            x = tl.where(mask, x, 0.0)  # padding lanes hold -inf
            if HAS_WEIGHT:
                z_i += tl.load(W + offs, mask=mask, other=0.0) * x
            else:
                z_i += x
    m = tl.max(m_i, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    lse = m + tl.log(tl.sum(s_i * tl.exp(m_i - m_ref), 0))

    # ---- the row's loss
    x_t = tl.load(X + t).to(ACC)
    if HAS_WEIGHT:
        w_t = tl.load(W + t)
    else:
        w_t = 1.0
    loss = (1.0 - eps) * w_t * (lse - x_t)
    if SMOOTH:
        loss += eps / C * (weight_sum * lse - tl.sum(z_i, 0))
    tl.store(Loss + row, tl.where(valid, loss, 0.0))

    # ---- sweep 2: the gradient
    if HAS_GRAD:
        # an ignored row's gradient is 0, whatever the scale (inf for a 'mean' over no rows)
        scale = tl.where(valid, tl.load(Params + 2), 0.0)
        coef_p = scale * ((1.0 - eps) * w_t + eps * weight_sum / C)
        coef_w = scale * eps / C
        coef_t = scale * (1.0 - eps) * w_t
        for c0 in range(0, C, BLOCK_SIZE):
            offs = c0 + cols
            mask = offs < C
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
            g = tl.exp(x - lse) * coef_p
            if SMOOTH:
                if HAS_WEIGHT:
                    g -= coef_w * tl.load(W + offs, mask=mask, other=0.0)
                else:
                    g -= coef_w
            g = tl.where(offs == t, g - coef_t, g)
            tl.store(G + offs, g.to(G.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                       label_smoothing: float, grad_scale: float | torch.Tensor, row_losses: torch.Tensor,
                       grad: torch.Tensor | None) -> None:
    """Per-row losses into `row_losses` (opmath dtype) and, when `grad` is given, the gradient times
    `grad_scale` (a float or a 0-d tensor: no host sync) into it (logits' dtype, float32 for bf16/fp16
    logits, or `logits` itself). Targets must already be checked (pyeff.ops.cross_entropy.check_targets)."""
    rows, classes = logits.shape
    if rows == 0:
        return
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    opts = dict(dtype=row_losses.dtype, device=logits.device)
    if weight is not None:
        weight = weight.to(**opts).contiguous()
        weight_sum = weight.sum()
    else:
        weight_sum = torch.tensor(float(classes), **opts)
    scale = grad_scale.to(**opts) if isinstance(grad_scale, torch.Tensor) else torch.tensor(grad_scale, **opts)
    params = torch.stack([torch.tensor(float(label_smoothing), **opts), weight_sum, scale.reshape(())])
    block = min(triton.next_power_of_2(classes), 4096)
    num_warps = 4 if block <= 1024 else 8 if block <= 2048 else 16
    _cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0), target, weight if weight is not None else row_losses, row_losses,
        grad if grad is not None else logits, grad.stride(0) if grad is not None else 0,
        classes, ignore_index, params,
        HAS_WEIGHT=weight is not None, SMOOTH=label_smoothing > 0, HAS_GRAD=grad is not None, ACC=acc,
        BLOCK_SIZE=block, num_warps=num_warps,
    )
