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

from .._dtypes import opmath_dtype
from . import _state as Q
from . import _tables as T
from ._optim import advance_steps, column, load_param, mode_of, program_chunk, step_scalars
from ._tables import div_ieee, f64, pow_int, sqrt_ieee

# The columns of a tensor's row in the table.
(_NUMEL, _PARAM, _GRAD, _EXP_AVG, _EXP_AVG_SQ, _MAX_SQ, _MASTER, _COMP, _STEP, _EXP_AVG_ABSMAX, _EXP_AVG_SQ_ABSMAX,
 _MAX_SQ_ABSMAX, _SEED) = map(tl.constexpr, range(13))
_COLUMNS = tl.constexpr(13)
_VECTOR_COLUMNS = tuple(range(1, 8))  # param .. compensation
# Stochastic rounding's slots (NOTE [random bits]): word 0 exp_avg | exp_avg_sq, word 1 max_exp_avg_sq | parameter.
_SLOT_EXP_AVG, _SLOT_EXP_AVG_SQ, _SLOT_MAX_SQ, _SLOT_PARAM = map(tl.constexpr, range(4))


@triton.jit
def _adam_math(p, g, m, v, x, grad_mult, decay, weight_decay, lerp_weight, beta2, one_minus_beta2, bc2_sqrt, eps,
               neg_step_size, HAS_MULT: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
               DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr):
    """csrc/adam_math.h: (p, m, v, vmax) after one step (x: the old vmax when AMSGRAD)."""
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
        x = tl.maximum(x, v, propagate_nan=tl.PropagateNan.ALL)
        second = x
    denom = div_ieee(sqrt_ieee(second), bc2_sqrt) + eps
    p = p + div_ieee(neg_step_size * m, denom)
    return p, m, v, x


@triton.jit
def _adam_kernel(
    Table,  # (tensors, 13) int64: numel, the addresses of the arrays, the step count and the absmax, the seed
    Chunks,  # (programs, 2) int64: tensor index, first element
    GradMult,  # fp32 scalar, read when HAS_MULT
    FoundInf,  # fp32 scalar, read when HAS_FOUND_INF
    LrTensor,  # fp32/fp64 scalar, read when HAS_LR_TENSOR
    lr_bits, beta1_bits, beta2_bits, eps_bits, weight_decay_bits,  # doubles (NOTE [double scalars])
    P: tl.constexpr,  # parameter dtype
    G: tl.constexpr,  # gradient dtype
    M: tl.constexpr,  # moment dtype (unless CODED)
    STEP: tl.constexpr,  # step-count dtype
    ACC: tl.constexpr,  # math dtype
    MODE: tl.constexpr,  # PLAIN, MASTER, KAHAN (NOTE [low-precision parameter modes])
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    HAS_MULT: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
    CODED: tl.constexpr,  # moments are int8 codes (NOTE [compressed optimizer state])
    SR: tl.constexpr,  # round bf16 values and codes stochastically (NOTE [random bits])
    ALIGNED: tl.constexpr,  # every array 16-byte aligned
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    QBLOCKS: tl.constexpr,  # int8 blocks per step of a CODED program's loop
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

    k0, k1 = Q.random_key(tl.load(row + _SEED), step, 0)  # exp_avg, exp_avg_sq
    k2, k3 = Q.random_key(tl.load(row + _SEED), step, 1)  # max_exp_avg_sq, parameter

    param = column(row, _PARAM, P, ALIGNED)
    grad = column(row, _GRAD, G, ALIGNED)
    master = column(row, _MASTER, tl.float32, ALIGNED)
    comp = column(row, _COMP, P, ALIGNED)
    if CODED:
        # ---- int8 moments: QBLOCKS whole blocks at a time, a row each
        exp_avg = column(row, _EXP_AVG, tl.uint8, False)
        exp_avg_sq = column(row, _EXP_AVG_SQ, tl.uint8, False)
        max_sq = column(row, _MAX_SQ, tl.uint8, False)
        exp_avg_absmax = column(row, _EXP_AVG_ABSMAX, tl.float32, False)
        exp_avg_sq_absmax = column(row, _EXP_AVG_SQ_ABSMAX, tl.float32, False)
        max_sq_absmax = column(row, _MAX_SQ_ABSMAX, tl.float32, False)
        for off in range(0, end - start, QBLOCKS * Q.QUANT_BLOCK):
            blocks, i, mask, bmask = Q.block_tile(start + off, end, QBLOCKS)
            p = load_param(param, master, i, mask, ACC, MODE)
            old = p
            g = tl.load(grad + i, mask=mask).to(ACC)
            m = Q.load_codes(exp_avg, exp_avg_absmax, i, blocks, mask, bmask, True)
            v = Q.load_codes(exp_avg_sq, exp_avg_sq_absmax, i, blocks, mask, bmask, False)
            x = v
            if AMSGRAD:
                x = Q.load_codes(max_sq, max_sq_absmax, i, blocks, mask, bmask, False)
            p, m, v, x = _adam_math(p, g, m, v, x, grad_mult, decay, weight_decay, lerp_weight, beta2,
                                    one_minus_beta2, bc2_sqrt, eps, neg_step_size, HAS_MULT, MAXIMIZE, WEIGHT_DECAY,
                                    DECOUPLED, AMSGRAD)
            Q.store_codes(exp_avg, exp_avg_absmax, i, blocks, mask, bmask, m, True, SR, k0, k1, _SLOT_EXP_AVG)
            Q.store_codes(exp_avg_sq, exp_avg_sq_absmax, i, blocks, mask, bmask, v, False, SR, k0, k1,
                          _SLOT_EXP_AVG_SQ)
            if AMSGRAD:
                Q.store_codes(max_sq, max_sq_absmax, i, blocks, mask, bmask, x, False, SR, k2, k3, _SLOT_MAX_SQ)
            Q.store_param(param, master, comp, i, mask, p, old, P, ACC, MODE, SR, k2, k3, _SLOT_PARAM)
    else:
        exp_avg = column(row, _EXP_AVG, M, ALIGNED)
        exp_avg_sq = column(row, _EXP_AVG_SQ, M, ALIGNED)
        max_sq = column(row, _MAX_SQ, M, ALIGNED)
        for off in range(0, end - start, BLOCK):
            i = start + off + tl.arange(0, BLOCK)
            mask = i < end
            # ---- load
            p = load_param(param, master, i, mask, ACC, MODE)
            old = p
            g = tl.load(grad + i, mask=mask).to(ACC)
            m = tl.load(exp_avg + i, mask=mask).to(ACC)
            v = tl.load(exp_avg_sq + i, mask=mask).to(ACC)
            x = v
            if AMSGRAD:
                x = tl.load(max_sq + i, mask=mask).to(ACC)
            # ---- update (csrc/adam_math.h)
            p, m, v, x = _adam_math(p, g, m, v, x, grad_mult, decay, weight_decay, lerp_weight, beta2,
                                    one_minus_beta2, bc2_sqrt, eps, neg_step_size, HAS_MULT, MAXIMIZE, WEIGHT_DECAY,
                                    DECOUPLED, AMSGRAD)
            # ---- store
            Q.store_rounded(exp_avg, i, mask, m, M, SR, k0, k1, _SLOT_EXP_AVG)
            Q.store_rounded(exp_avg_sq, i, mask, v, M, SR, k0, k1, _SLOT_EXP_AVG_SQ)
            if AMSGRAD:
                Q.store_rounded(max_sq, i, mask, x, M, SR, k2, k3, _SLOT_MAX_SQ)
            Q.store_param(param, master, comp, i, mask, p, old, P, ACC, MODE, SR, k2, k3, _SLOT_PARAM)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, compensations,
              exp_avg_absmaxes, exp_avg_sq_absmaxes, max_exp_avg_sq_absmaxes, rng_seeds, lr, beta1, beta2, eps,
              weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult=None, found_inf=None,
              lr_tensor=None) -> None:
    """The Triton backend of pyeff.ops.adam_step (the reference's signature; inputs already bucketed
    and checked by the op layer)."""
    if not params:
        return
    device = params[0].device
    mode = mode_of(master_params, compensations)
    coded = bool(exp_avg_absmaxes)
    n = len(params)
    work = [p.numel() for p in params]
    rows = list(zip(work, T.addresses(params, n), T.addresses(grads, n), T.addresses(exp_avgs, n),
                    T.addresses(exp_avg_sqs, n), T.addresses(max_exp_avg_sqs if amsgrad else None, n),
                    T.addresses(master_params, n), T.addresses(compensations, n), T.addresses(state_steps, n),
                    T.addresses(exp_avg_absmaxes if coded else None, n),
                    T.addresses(exp_avg_sq_absmaxes if coded else None, n),
                    T.addresses(max_exp_avg_sq_absmaxes if coded and amsgrad else None, n),
                    rng_seeds if rng_seeds else [0] * n, strict=True))
    table, chunks, programs = T.tables(rows, work, device)
    if programs:
        acc = opmath_dtype(params[0].dtype)
        _adam_kernel[(programs,)](
            table, chunks, grad_mult if grad_mult is not None else table, found_inf if found_inf is not None else table,
            lr_tensor if lr_tensor is not None else table, T.bits(lr), T.bits(beta1), T.bits(beta2), T.bits(eps),
            T.bits(weight_decay), P=T.to_tl(params[0].dtype), G=T.to_tl(grads[0].dtype),
            M=tl.float32 if coded else T.to_tl(exp_avgs[0].dtype), STEP=T.to_tl(state_steps[0].dtype),
            ACC=T.to_tl(acc), MODE=mode, AMSGRAD=amsgrad, MAXIMIZE=maximize, DECOUPLED=decoupled_weight_decay,
            WEIGHT_DECAY=weight_decay != 0, HAS_MULT=grad_mult is not None, HAS_FOUND_INF=found_inf is not None,
            HAS_LR_TENSOR=lr_tensor is not None, CODED=coded, SR=bool(rng_seeds) and acc == torch.float32,
            ALIGNED=T.all_aligned(rows, _VECTOR_COLUMNS), CHUNK=T.CHUNK, BLOCK=T.BLOCK,
            QBLOCKS=Q.blocks_per_step(T.BLOCK), **T.launch_options())
    advance_steps(state_steps, found_inf)
    T.bump_versions(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, compensations,
                    exp_avg_absmaxes, exp_avg_sq_absmaxes, max_exp_avg_sq_absmaxes)
