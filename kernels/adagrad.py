"""Triton kernel for adagrad_step (contract and reference: pyeff/ops/adagrad.py), one launch per call
over every tensor, dense gradients and the rows of coalesced sparse ones alike (NOTE [Triton
multi-tensor launch] in kernels/_tables.py, NOTE [sparse Adagrad rows] in
csrc/cpu/adagrad_kernel.h). Per element, in the math type, in torch.optim.Adagrad's order, as
csrc/adagrad_math.h:

    g = grad * grad_mult (maximize: -g);  g = g + weight_decay * p (dense only)
    s = s + g * g;  std = sqrt(s) + eps
    p = p + (-clr * g) / std (dense)  or  p + -clr * (g / std) (sparse)

with clr = lr / (1 + (t - 1) * lr_decay) in double from the step count t after the increment,
rounded once. A set found_inf makes every program write nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dtypes import opmath_dtype
from . import _state as Q
from . import _tables as T
from ._optim import advance_steps, column, load_param, mode_of, program_chunk, step_scalars
from ._tables import div_ieee, f64, sqrt_ieee

MAX_SPARSE_DIMS = tl.constexpr(4)
# The columns of a tensor's row in the table (a sparse gradient's rows: NOTE [sparse Adagrad rows]).
(_NUMEL, _PARAM, _GRAD, _SUM, _MASTER, _COMP, _STEP, _SUM_ABSMAX, _SEED, _INDICES, _INDEX_DIM_STRIDE,
 _INDEX_ROW_STRIDE, _ROW_NUMEL, _SPARSE_DIM, _SIZES) = map(tl.constexpr, range(15))
_STRIDES = tl.constexpr(_SIZES + MAX_SPARSE_DIMS.value)
_COLUMNS = tl.constexpr(_STRIDES + MAX_SPARSE_DIMS.value)
_VECTOR_COLUMNS = tuple(range(1, 6))  # param .. compensation


@triton.jit
def _adagrad_kernel(
    Table,  # (tensors, _COLUMNS) int64
    Chunks,  # (programs, 2) int64: tensor index, first element
    GradMult,  # fp32 scalar, read when HAS_MULT
    FoundInf,  # fp32 scalar, read when HAS_FOUND_INF
    LrTensor,  # fp32/fp64 scalar, read when HAS_LR_TENSOR
    lr_bits, lr_decay_bits, eps_bits, weight_decay_bits,  # doubles (NOTE [double scalars])
    P: tl.constexpr, G: tl.constexpr, S: tl.constexpr, STEP: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr,
    MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, HAS_MULT: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr, HAS_SPARSE: tl.constexpr, ALIGNED: tl.constexpr,
    CODED: tl.constexpr,  # sums are int8 codes, gradients dense (NOTE [compressed optimizer state])
    SR: tl.constexpr,  # round bf16 values and codes stochastically (NOTE [random bits])
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    QBLOCKS: tl.constexpr,  # int8 blocks per step of a CODED program's loop
):
    row, start, end = program_chunk(Table, Chunks, FoundInf, _COLUMNS, HAS_FOUND_INF, CHUNK)
    # ---- this tensor's coefficients: double, rounded once to the math type
    lr, step, grad_mult = step_scalars(row, _STEP, lr_bits, LrTensor, GradMult, STEP, ACC, HAS_LR_TENSOR, HAS_MULT)
    neg_clr = (-(lr / (1.0 + (step - 1.0) * f64(lr_decay_bits)))).to(ACC)
    eps = f64(eps_bits).to(ACC)
    weight_decay = f64(weight_decay_bits).to(ACC)

    # Stochastic rounding's word 0 (NOTE [random bits]): the sum in its low half, the parameter in its high half.
    k0, k1 = Q.random_key(tl.load(row + _SEED), step, 0)

    param = column(row, _PARAM, P, ALIGNED)
    grad = column(row, _GRAD, G, ALIGNED)
    master = column(row, _MASTER, tl.float32, ALIGNED)
    comp = column(row, _COMP, P, ALIGNED)
    if CODED:
        # ---- int8 sums, dense gradients: QBLOCKS whole blocks at a time, a row each
        codes = column(row, _SUM, tl.uint8, False)
        absmax = column(row, _SUM_ABSMAX, tl.float32, False)
        for off in range(0, end - start, QBLOCKS * Q.QUANT_BLOCK):
            blocks, i, mask, bmask = Q.block_tile(start + off, end, QBLOCKS)
            p = load_param(param, master, i, mask, ACC, MODE)
            old = p
            g = tl.load(grad + i, mask=mask).to(ACC)
            s = Q.load_codes(codes, absmax, i, blocks, mask, bmask, False)
            p, s = _adagrad_math(p, g, s, grad_mult, weight_decay, eps, neg_clr, False, False, HAS_MULT, MAXIMIZE,
                                 WEIGHT_DECAY)
            Q.store_codes(codes, absmax, i, blocks, mask, bmask, s, False, SR, k0, k1, 0)
            Q.store_param(param, master, comp, i, mask, p, old, P, ACC, MODE, SR, k0, k1, 1)
        return
    sums = column(row, _SUM, S, ALIGNED)
    indices = tl.load(row + _INDICES).to(tl.pointer_type(tl.int64))
    sparse = False
    if HAS_SPARSE:
        sparse = tl.load(row + _INDICES) != 0

    for off in range(0, end - start, BLOCK):
        j = start + off + tl.arange(0, BLOCK)
        mask = j < end
        i = j  # the element of the parameter and its state
        if HAS_SPARSE:
            if sparse:  # element j of the values: row j // row_numel lands at sum_d index_d * stride_d
                row_numel = tl.load(row + _ROW_NUMEL)
                r = j // row_numel
                i = j - r * row_numel
                for d in tl.static_range(MAX_SPARSE_DIMS):
                    in_dims = d < tl.load(row + _SPARSE_DIM)
                    index = tl.load(indices + d * tl.load(row + _INDEX_DIM_STRIDE) + r * tl.load(row + _INDEX_ROW_STRIDE),
                                    mask=mask & in_dims, other=0)
                    tl.device_assert((index >= 0) & (index < tl.load(row + _SIZES + d)) | ~in_dims | ~mask,
                                     "adagrad_step: a sparse gradient's index is outside its parameter")
                    i += tl.where(in_dims, index * tl.load(row + _STRIDES + d), 0)
        # ---- load
        p = load_param(param, master, i, mask, ACC, MODE)
        old = p
        g = tl.load(grad + j, mask=mask).to(ACC)
        s = tl.load(sums + i, mask=mask).to(ACC)
        # ---- update (csrc/adagrad_math.h)
        p, s = _adagrad_math(p, g, s, grad_mult, weight_decay, eps, neg_clr, sparse, HAS_SPARSE, HAS_MULT, MAXIMIZE,
                             WEIGHT_DECAY)
        # ---- store
        Q.store_rounded(sums, i, mask, s, S, SR, k0, k1, 0)
        Q.store_param(param, master, comp, i, mask, p, old, P, ACC, MODE, SR, k0, k1, 1)


@triton.jit
def _adagrad_math(p, g, s, grad_mult, weight_decay, eps, neg_clr, sparse, HAS_SPARSE: tl.constexpr,
                  HAS_MULT: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr):
    """csrc/adagrad_math.h: (p, s) after one step; `sparse` (when HAS_SPARSE): a sparse gradient's
    value (no weight decay, torch's sparse update order)."""
    if HAS_MULT:
        g = g * grad_mult
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:  # dense gradients only (the op refuses weight decay with sparse ones)
        g = g + weight_decay * p
    s = s + g * g
    std = sqrt_ieee(s) + eps
    if HAS_SPARSE:
        p = tl.where(sparse, p + neg_clr * div_ieee(g, std), p + div_ieee(neg_clr * g, std))
    else:
        p = p + div_ieee(neg_clr * g, std)
    return p, s


def _row(i, p, g, values, s, master, comp, step, absmax, seed) -> tuple[int, ...]:
    """A tensor's row of the table; `values`: the gradient, or a sparse one's contiguous values."""
    sparse = [0] * (5 + 2 * MAX_SPARSE_DIMS.value)
    numel = p.numel()
    if g.is_sparse:
        indices = g._indices()
        nnz = g._nnz()
        dims = g.sparse_dim()
        if dims > MAX_SPARSE_DIMS.value:
            raise RuntimeError(f"adagrad_step: grads[{i}] has {dims} sparse dimensions; the triton backend takes up "
                               f"to {MAX_SPARSE_DIMS.value}")
        numel = values.numel()
        sparse = [indices.data_ptr(), indices.stride(0), indices.stride(1), values.numel() // nnz if nnz else 1, dims,
                  *[p.size(d) if d < dims else 0 for d in range(MAX_SPARSE_DIMS.value)],
                  *[p.stride(d) if d < dims else 0 for d in range(MAX_SPARSE_DIMS.value)]]
    return (numel, p.data_ptr(), values.data_ptr(), s.data_ptr(), T.address(master), T.address(comp), step.data_ptr(),
            T.address(absmax), seed, *sparse)


def adagrad_step(params, grads, state_sums, state_steps, master_params, compensations, state_sum_absmaxes, rng_seeds, lr,
                 lr_decay, weight_decay, eps, maximize, grad_mult=None, found_inf=None, lr_tensor=None) -> None:
    """The Triton backend of pyeff.ops.adagrad_step (the reference's signature; inputs bucketed by the
    op layer)."""
    if not params:
        return
    device = params[0].device
    mode = mode_of(master_params, compensations)
    # Sparse gradients coalesced (the update is non-linear in them) and their values made contiguous;
    # alive until the launch is queued (the caching allocator reuses their memory in stream order).
    grads = [g.coalesce() if g.is_sparse else g for g in grads]
    values = [g._values().contiguous() if g.is_sparse else g for g in grads]
    has_sparse = any(g.is_sparse for g in grads)
    if has_sparse and weight_decay != 0:
        raise RuntimeError("adagrad_step: weight_decay option is not compatible with sparse gradients")
    coded = bool(state_sum_absmaxes)
    rows = [_row(i, p, grads[i], values[i], state_sums[i], master_params[i] if master_params else None,
                 compensations[i] if compensations else None, state_steps[i],
                 state_sum_absmaxes[i] if coded else None, rng_seeds[i] if rng_seeds else 0)
            for i, p in enumerate(params)]
    table, chunks, programs = T.tables(rows, [r[0] for r in rows], device)
    if programs:
        acc = opmath_dtype(params[0].dtype)
        _adagrad_kernel[(programs,)](
            table, chunks, grad_mult if grad_mult is not None else table, found_inf if found_inf is not None else table,
            lr_tensor if lr_tensor is not None else table, T.bits(lr), T.bits(lr_decay), T.bits(eps),
            T.bits(weight_decay), P=T.to_tl(params[0].dtype), G=T.to_tl(values[0].dtype),
            S=tl.float32 if coded else T.to_tl(state_sums[0].dtype), STEP=T.to_tl(state_steps[0].dtype),
            ACC=T.to_tl(acc), MODE=mode, MAXIMIZE=maximize, WEIGHT_DECAY=weight_decay != 0, HAS_MULT=grad_mult is not None,
            HAS_FOUND_INF=found_inf is not None, HAS_LR_TENSOR=lr_tensor is not None, HAS_SPARSE=has_sparse,
            ALIGNED=not has_sparse and T.all_aligned(rows, _VECTOR_COLUMNS), CODED=coded,
            SR=bool(rng_seeds) and acc == torch.float32, CHUNK=T.CHUNK, BLOCK=T.BLOCK,
            QBLOCKS=Q.blocks_per_step(T.BLOCK), **T.launch_options())
    advance_steps(state_steps, found_inf)
    T.bump_versions(params, state_sums, state_steps, master_params, compensations, state_sum_absmaxes)
