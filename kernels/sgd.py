"""Triton kernel for sgd_step (contract and reference: pyeff/ops/sgd.py), one launch per call over
every tensor (NOTE [Triton multi-tensor launch] in kernels/_tables.py). Per element, in the math
type (fp32; fp64 for fp64 parameters), in torch.optim.SGD's order, as csrc/sgd_math.h:

    g = grad * grad_mult (maximize: -g);  g = g + weight_decay * p
    buf = g (the tensor's first step)  or  buf = buf * momentum + (1 - dampening) * g
    g = g + momentum * buf (nesterov)  or  g = buf;  p = p + (-lr) * g

with every coefficient a double rounded once. Without momentum there is no buffer. A set found_inf
makes every program write nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dtypes import opmath_dtype
from . import _tables as T
from ._optim import column, load_param, lr_and_multiplier, mode_of, program_chunk, store_param
from ._rounding import cast_rne
from ._tables import f64

# The columns of a tensor's row in the table.
_NUMEL, _PARAM, _GRAD, _BUF, _MASTER, _COMP, _FIRST, _COLUMNS = map(tl.constexpr, range(8))
_VECTOR_COLUMNS = tuple(range(1, 6))  # param .. compensation


@triton.jit
def _sgd_kernel(
    Table,  # (tensors, 7) int64: numel, the addresses of the arrays, 1 on the tensor's first step
    Chunks,  # (programs, 2) int64: tensor index, first element
    GradMult,  # fp32 scalar, read when HAS_MULT
    FoundInf,  # fp32 scalar, read when HAS_FOUND_INF
    LrTensor,  # fp32/fp64 scalar, read when HAS_LR_TENSOR
    lr_bits, momentum_bits, dampening_bits, weight_decay_bits,  # doubles (NOTE [double scalars])
    P: tl.constexpr,  # parameter dtype
    G: tl.constexpr,  # gradient dtype
    B: tl.constexpr,  # momentum buffer dtype (fp32 next to fp32 master weights, else P)
    ACC: tl.constexpr,  # math dtype
    MODE: tl.constexpr,  # PLAIN, MASTER, KAHAN (NOTE [low-precision parameter modes])
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    HAS_MULT: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
    ALIGNED: tl.constexpr,  # every array 16-byte aligned
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    row, start, end = program_chunk(Table, Chunks, FoundInf, _COLUMNS, HAS_FOUND_INF, CHUNK)
    # ---- the coefficients: double, rounded once to the math type
    lr, grad_mult = lr_and_multiplier(lr_bits, LrTensor, GradMult, ACC, HAS_LR_TENSOR, HAS_MULT)
    neg_lr = (-lr).to(ACC)
    momentum = f64(momentum_bits).to(ACC)
    one_minus_dampening = (1.0 - f64(dampening_bits)).to(ACC)
    weight_decay = f64(weight_decay_bits).to(ACC)
    first = tl.load(row + _FIRST) != 0  # the buffer is created from the gradient, not read

    param = column(row, _PARAM, P, ALIGNED)
    grad = column(row, _GRAD, G, ALIGNED)
    buf = column(row, _BUF, B, ALIGNED)
    master = column(row, _MASTER, tl.float32, ALIGNED)
    comp = column(row, _COMP, P, ALIGNED)

    for off in range(0, end - start, BLOCK):
        i = start + off + tl.arange(0, BLOCK)
        mask = i < end
        p = load_param(param, master, i, mask, ACC, MODE)
        old = p
        g = tl.load(grad + i, mask=mask).to(ACC)
        # ---- update (csrc/sgd_math.h)
        if HAS_MULT:
            g = g * grad_mult
        if MAXIMIZE:
            g = -g
        if WEIGHT_DECAY:
            g = g + weight_decay * p
        if MOMENTUM:
            b = tl.load(buf + i, mask=mask & ~first, other=0).to(ACC)
            b = tl.where(first, g, b * momentum + one_minus_dampening * g)
            tl.store(buf + i, cast_rne(b, B), mask=mask)
            if NESTEROV:
                g = g + momentum * b
            else:
                g = b
        p = p + neg_lr * g
        store_param(param, master, comp, i, mask, p, old, P, ACC, MODE)


def sgd_step(params, grads, momentum_buffers, is_first_step, master_params, compensations, lr, momentum, dampening,
             weight_decay, nesterov, maximize, grad_mult=None, found_inf=None, lr_tensor=None) -> None:
    """The Triton backend of pyeff.ops.sgd_step (the reference's signature; inputs already bucketed
    and checked by the op layer)."""
    if not params:
        return
    device = params[0].device
    mode = mode_of(master_params, compensations)
    with_momentum = momentum != 0
    n = len(params)
    work = [p.numel() for p in params]
    first = [int(f) for f in is_first_step] if with_momentum else [0] * n
    rows = list(zip(work, T.addresses(params, n), T.addresses(grads, n),
                    T.addresses(momentum_buffers if with_momentum else None, n), T.addresses(master_params, n),
                    T.addresses(compensations, n), first, strict=True))
    table, chunks, programs = T.tables(rows, work, device)
    if programs:
        acc = opmath_dtype(params[0].dtype)
        buf_dtype = momentum_buffers[0].dtype if with_momentum else params[0].dtype
        _sgd_kernel[(programs,)](
            table, chunks, grad_mult if grad_mult is not None else table, found_inf if found_inf is not None else table,
            lr_tensor if lr_tensor is not None else table, T.bits(lr), T.bits(momentum), T.bits(dampening),
            T.bits(weight_decay), P=T.to_tl(params[0].dtype), G=T.to_tl(grads[0].dtype), B=T.to_tl(buf_dtype),
            ACC=T.to_tl(acc), MODE=mode, MOMENTUM=with_momentum, NESTEROV=nesterov, MAXIMIZE=maximize,
            WEIGHT_DECAY=weight_decay != 0, HAS_MULT=grad_mult is not None, HAS_FOUND_INF=found_inf is not None,
            HAS_LR_TENSOR=lr_tensor is not None, ALIGNED=T.all_aligned(rows, _VECTOR_COLUMNS), CHUNK=T.CHUNK,
            BLOCK=T.BLOCK, **T.launch_options())
    T.bump_versions(params, momentum_buffers, master_params, compensations)
