"""Triton kernel for adam_step (contract and reference: pyeff/ops/adam.py), one launch per call over
every tensor (NOTE [Triton multi-tensor launch] in kernels/_tables.py). Per element, in the math
type (fp32; fp64 for fp64 parameters), in torch.optim.Adam's order, as csrc/adam_math.h:

    g = grad * grad_mult (maximize: -g);  p = p * decay (AdamW) or g = g + weight_decay * p (Adam)
    m = m + (1 - beta1) * (g - m);  v = v * beta2 + (1 - beta2) * g * g;  vmax = max(vmax, v)
    p = p + (-step_size * m) / (sqrt(v or vmax) / bias_correction2_sqrt + eps)

with decay = 1 - lr * weight_decay, step_size = lr / (1 - beta1^t) and bias_correction2_sqrt =
sqrt(1 - beta2^t) computed in double from the tensor's step count t (after the increment) and
rounded once. A set found_inf makes every program write nothing; a second launch advances the step
counts unless it is set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tables as T
from ._optim import advance_steps, column, load_param, mode_of, program_chunk, step_scalars, store_param
from ._rounding import cast_rne
from ._tables import div_ieee, f64, pow_int, sqrt_ieee

# The columns of a tensor's row in the table.
_NUMEL, _PARAM, _GRAD, _EXP_AVG, _EXP_AVG_SQ, _MAX_SQ, _MASTER, _COMP, _STEP = map(tl.constexpr, range(9))
_COLUMNS = tl.constexpr(9)
_VECTOR_COLUMNS = tuple(range(1, 8))  # param .. compensation


@triton.jit
def _adam_kernel(
    Table,  # (tensors, 9) int64: numel, then the addresses of the arrays and of the step count
    Chunks,  # (programs, 2) int64: tensor index, first element
    GradMult,  # fp32 scalar, read when HAS_MULT
    FoundInf,  # fp32 scalar, read when HAS_FOUND_INF
    LrTensor,  # fp32/fp64 scalar, read when HAS_LR_TENSOR
    lr_bits, beta1_bits, beta2_bits, eps_bits, weight_decay_bits,  # doubles (NOTE [double scalars])
    P: tl.constexpr,  # parameter dtype
    G: tl.constexpr,  # gradient dtype
    M: tl.constexpr,  # moment dtype (fp32 next to fp32 master weights, else P)
    STEP: tl.constexpr,  # step-count dtype
    ACC: tl.constexpr,  # math dtype
    MODE: tl.constexpr,  # PLAIN, MASTER, KAHAN (NOTE [low-precision parameter modes])
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    HAS_MULT: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
    ALIGNED: tl.constexpr,  # every array 16-byte aligned
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    row, start, end = program_chunk(Table, Chunks, FoundInf, _COLUMNS, HAS_FOUND_INF, CHUNK)
    # ---- this tensor's coefficients: double, rounded once to the math type
    lr, step, grad_mult = step_scalars(row, _STEP, lr_bits, LrTensor, GradMult, STEP, ACC, HAS_LR_TENSOR, HAS_MULT)
    beta1 = f64(beta1_bits)
    beta2 = f64(beta2_bits)
    weight_decay = f64(weight_decay_bits)
    neg_step_size = (-(lr / (1.0 - pow_int(beta1, step)))).to(ACC)
    bc2_sqrt = tl.sqrt(1.0 - pow_int(beta2, step)).to(ACC)
    lerp_weight = (1.0 - beta1).to(ACC)
    one_minus_beta2 = (1.0 - beta2).to(ACC)
    beta2 = beta2.to(ACC)
    eps = f64(eps_bits).to(ACC)
    decay = (1.0 - lr * weight_decay).to(ACC)
    weight_decay = weight_decay.to(ACC)

    param = column(row, _PARAM, P, ALIGNED)
    grad = column(row, _GRAD, G, ALIGNED)
    exp_avg = column(row, _EXP_AVG, M, ALIGNED)
    exp_avg_sq = column(row, _EXP_AVG_SQ, M, ALIGNED)
    max_sq = column(row, _MAX_SQ, M, ALIGNED)
    master = column(row, _MASTER, tl.float32, ALIGNED)
    comp = column(row, _COMP, P, ALIGNED)

    for off in range(0, end - start, BLOCK):
        i = start + off + tl.arange(0, BLOCK)
        mask = i < end
        # ---- load
        p = load_param(param, master, i, mask, ACC, MODE)
        old = p
        g = tl.load(grad + i, mask=mask).to(ACC)
        m = tl.load(exp_avg + i, mask=mask).to(ACC)
        v = tl.load(exp_avg_sq + i, mask=mask).to(ACC)
        # ---- update (csrc/adam_math.h)
        if HAS_MULT:
            g = g * grad_mult
        if MAXIMIZE:
            g = -g
        if WEIGHT_DECAY:
            if DECOUPLED:
                p = p * decay
            else:
                g = g + weight_decay * p
        m = m + lerp_weight * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        second = v
        if AMSGRAD:
            vmax = tl.maximum(tl.load(max_sq + i, mask=mask).to(ACC), v, propagate_nan=tl.PropagateNan.ALL)
            tl.store(max_sq + i, cast_rne(vmax, M), mask=mask)
            second = vmax
        denom = div_ieee(sqrt_ieee(second), bc2_sqrt) + eps
        p = p + div_ieee(neg_step_size * m, denom)
        # ---- store
        tl.store(exp_avg + i, cast_rne(m, M), mask=mask)
        tl.store(exp_avg_sq + i, cast_rne(v, M), mask=mask)
        store_param(param, master, comp, i, mask, p, old, P, ACC, MODE)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, compensations, lr,
              beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult=None,
              found_inf=None, lr_tensor=None) -> None:
    """The Triton backend of pyeff.ops.adam_step (the reference's signature; inputs already bucketed
    and checked by the op layer)."""
    if not params:
        return
    device = params[0].device
    mode = mode_of(master_params, compensations)
    rows, work = [], []
    for i, p in enumerate(params):
        rows.append((p.numel(), p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                     exp_avg_sqs[i].data_ptr(), T.address(max_exp_avg_sqs[i] if amsgrad else None),
                     T.address(master_params[i] if master_params else None),
                     T.address(compensations[i] if compensations else None), state_steps[i].data_ptr()))
        work.append(p.numel())
    table, chunks, programs = T.tables(rows, work, device)
    if programs:
        acc = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        _adam_kernel[(programs,)](
            table, chunks, grad_mult if grad_mult is not None else table, found_inf if found_inf is not None else table,
            lr_tensor if lr_tensor is not None else table, T.bits(lr), T.bits(beta1), T.bits(beta2), T.bits(eps),
            T.bits(weight_decay), P=T.to_tl(params[0].dtype), G=T.to_tl(grads[0].dtype), M=T.to_tl(exp_avgs[0].dtype),
            STEP=T.to_tl(state_steps[0].dtype), ACC=T.to_tl(acc), MODE=mode, AMSGRAD=amsgrad, MAXIMIZE=maximize,
            DECOUPLED=decoupled_weight_decay, WEIGHT_DECAY=weight_decay != 0, HAS_MULT=grad_mult is not None,
            HAS_FOUND_INF=found_inf is not None, HAS_LR_TENSOR=lr_tensor is not None,
            ALIGNED=T.all_aligned(rows, _VECTOR_COLUMNS), CHUNK=T.CHUNK, BLOCK=T.BLOCK, **T.launch_options())
    advance_steps(state_steps, found_inf)
    T.bump_versions(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, compensations)
