"""What the Triton optimizer kernels (kernels/adam.py, adagrad.py, sgd.py) share: a program's chunk of the
table (NOTE [Triton multi-tensor launch] in kernels/_tables.py), the step's device scalars, the
parameter's storage in each NOTE [low-precision parameter modes], and the launch that advances the
step counts. The CUDA kernels' counterpart is csrc/cuda/optimizer.cuh."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tables as T
from ._rounding import cast_rne
from ._tables import f64

PLAIN, MASTER, KAHAN = 0, 1, 2


def mode_of(master_params, compensations) -> int:
    return MASTER if master_params else KAHAN if compensations else PLAIN


@triton.jit
def program_chunk(Table, Chunks, FoundInf, COLUMNS: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                  CHUNK: tl.constexpr):
    """(row, start, end): this program's tensor row and elements [start, end); none when found_inf
    is set (NOTE [overflow skip] in csrc/checks.h). Column 0 of a row is the element count."""
    pid = tl.program_id(0)
    t = tl.load(Chunks + 2 * pid)
    start = tl.multiple_of(tl.load(Chunks + 2 * pid + 1), CHUNK)
    row = Table + COLUMNS * t.to(tl.int64)
    end = tl.minimum(start + CHUNK, tl.load(row))
    if HAS_FOUND_INF:
        end = tl.where(tl.load(FoundInf) == 0, end, start)
    return row, start, end


@triton.jit
def column(row, k, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The array whose address is column k of the row, as a pointer to DTYPE (16-byte aligned when
    ALIGNED, so that accesses may be vectors)."""
    ptr = tl.load(row + k).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def lr_and_multiplier(lr_bits, LrTensor, GradMult, ACC: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
                      HAS_MULT: tl.constexpr):
    """(lr in double, grad_mult in ACC)."""
    lr = f64(lr_bits)
    if HAS_LR_TENSOR:
        lr = tl.load(LrTensor).to(tl.float64)
    grad_mult = tl.full((), 1.0, ACC)
    if HAS_MULT:
        grad_mult = tl.load(GradMult).to(ACC)
    return lr, grad_mult


@triton.jit
def step_scalars(row, STEP_COLUMN: tl.constexpr, lr_bits, LrTensor, GradMult, STEP: tl.constexpr,
                 ACC: tl.constexpr, HAS_LR_TENSOR: tl.constexpr, HAS_MULT: tl.constexpr):
    """(lr in double, the row's step count after the increment in double, grad_mult in ACC)."""
    lr, grad_mult = lr_and_multiplier(lr_bits, LrTensor, GradMult, ACC, HAS_LR_TENSOR, HAS_MULT)
    step = tl.load(tl.load(row + STEP_COLUMN).to(tl.pointer_type(STEP))).to(tl.float64) + 1.0
    return lr, step, grad_mult


@triton.jit
def load_param(param, master, i, mask, ACC: tl.constexpr, MODE: tl.constexpr):
    if MODE == 1:
        p = tl.load(master + i, mask=mask).to(ACC)
    else:
        p = tl.load(param + i, mask=mask).to(ACC)
    return p


@triton.jit
def store_param(param, master, comp, i, mask, p, old, P: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr):
    """Store the updated p of elements whose values were old before the update."""
    if MODE == 1:
        tl.store(master + i, p, mask=mask)
        tl.store(param + i, cast_rne(p, P), mask=mask)
    elif MODE == 2:  # NOTE [compensated summation] (csrc/low_precision_math.h)
        y = (p - old) + tl.load(comp + i, mask=mask).to(ACC)
        rounded = cast_rne(old + y, P)
        tl.store(param + i, rounded, mask=mask)
        tl.store(comp + i, cast_rne(y - (rounded.to(ACC) - old), P), mask=mask)
    else:
        tl.store(param + i, cast_rne(p, P), mask=mask)


@triton.jit
def _advance_steps_kernel(
    Steps,  # (n,) int64 addresses of the step counts
    FoundInf,  # fp32 scalar, read when HAS_FOUND_INF
    n,
    STEP: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:
        n = tl.where(tl.load(FoundInf) == 0, n, 0)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    ptrs = tl.load(Steps + i, mask=mask, other=0).to(tl.pointer_type(STEP))
    tl.store(ptrs, tl.load(ptrs, mask=mask) + 1, mask=mask)


def advance_steps(steps: list[torch.Tensor], found_inf: torch.Tensor | None) -> None:
    """Every step count + 1 (unless found_inf is set), in one launch, after the update read them."""
    table, _, _ = T.tables([(s.data_ptr(),) for s in steps], [0] * len(steps), steps[0].device)
    block = 128
    _advance_steps_kernel[(triton.cdiv(len(steps), block),)](
        table, found_inf if found_inf is not None else table, len(steps), STEP=T.to_tl(steps[0].dtype),
        HAS_FOUND_INF=found_inf is not None, BLOCK=block)
