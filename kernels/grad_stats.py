"""Triton kernels for grad_stats and step_control (contracts and references: pyeff/ops/grad_stats.py,
pyeff/ops/step_control.py).

grad_stats is deterministic (the same bits on every run) in two stages: one program per chunk of
one gradient (NOTE [Triton multi-tensor launch] in kernels/_tables.py) sums the squares of its
elements in BLOCK lanes of the math type (fp32; fp64 for fp64 gradients), reduces the lanes in a
fixed tree into a double partial and notes any inf/NaN; then one program adds the partials in a
fixed order. The partials live in a buffer kept per device and stream, so a call allocates nothing
after the first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tables as T

_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_partials: dict[tuple, torch.Tensor] = {}


@triton.jit
def _chunk_stats(x, start, end, ACC: tl.constexpr, BLOCK: tl.constexpr):
    sq = tl.zeros([BLOCK], dtype=ACC)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, end - start, BLOCK):
        i = start + off + tl.arange(0, BLOCK)
        v = tl.load(x + i, mask=i < end, other=0.0).to(ACC)
        sq += v * v
        bad |= ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32)
    return tl.sum(sq, axis=0).to(tl.float64), tl.max(bad, axis=0)


@triton.jit
def _grad_stats_partials_kernel(
    Table,  # (tensors, 3) int64: numel, address, dtype code (_DTYPES)
    Chunks,  # (programs, 2) int64: tensor index, first element
    Partials,  # (programs, 2) fp64: sum of squares, any inf/NaN
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(Chunks + 2 * pid)
    start = tl.load(Chunks + 2 * pid + 1)
    row = Table + 3 * t.to(tl.int64)
    end = tl.minimum(start + CHUNK, tl.load(row))
    address = tl.load(row + 1)
    code = tl.load(row + 2)
    if code == 0:
        s, bad = _chunk_stats(address.to(tl.pointer_type(tl.float32)), start, end, tl.float32, BLOCK)
    elif code == 1:
        s, bad = _chunk_stats(address.to(tl.pointer_type(tl.float64)), start, end, tl.float64, BLOCK)
    elif code == 2:
        s, bad = _chunk_stats(address.to(tl.pointer_type(tl.bfloat16)), start, end, tl.float32, BLOCK)
    else:
        s, bad = _chunk_stats(address.to(tl.pointer_type(tl.float16)), start, end, tl.float32, BLOCK)
    tl.store(Partials + 2 * pid, s)
    tl.store(Partials + 2 * pid + 1, bad.to(tl.float64))


@triton.jit
def _grad_stats_total_kernel(
    Partials,  # (n, 2) fp64
    Out,  # (2,) fp32: sum of squares, any inf/NaN
    n,
    BLOCK: tl.constexpr,
):
    total = tl.zeros([BLOCK], dtype=tl.float64)
    bad = tl.zeros([BLOCK], dtype=tl.float64)
    for off in range(0, n, BLOCK):
        i = off + tl.arange(0, BLOCK)
        total += tl.load(Partials + 2 * i, mask=i < n, other=0.0)
        bad = tl.maximum(bad, tl.load(Partials + 2 * i + 1, mask=i < n, other=0.0))
    tl.store(Out, tl.sum(total, axis=0).to(tl.float32))
    tl.store(Out + 1, tl.max(bad, axis=0).to(tl.float32))


def _partials_buffer(device: torch.device, programs: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buffer = _partials.get(key)
    if buffer is None or buffer.shape[0] < programs:
        buffer = _partials[key] = torch.empty((max(programs, 1), 2), dtype=torch.float64, device=device)
    return buffer


def grad_stats(grads: list[torch.Tensor], out: torch.Tensor) -> None:
    """The Triton backend of pyeff.ops.grad_stats (dense gradients on out's device)."""
    rows = [(g.numel(), g.data_ptr(), _DTYPES[g.dtype]) for g in grads]
    table, chunks, programs = T.tables(rows, [r[0] for r in rows], out.device)
    partials = _partials_buffer(out.device, programs)
    if programs:
        _grad_stats_partials_kernel[(programs,)](table, chunks, partials, CHUNK=T.CHUNK, BLOCK=T.BLOCK,
                                                 **T.launch_options())
    _grad_stats_total_kernel[(1,)](partials, out, programs, BLOCK=256, **T.launch_options())
    T.bump_versions([out])


@triton.jit
def _step_control_kernel(
    Stats,  # (2,) fp32, read when HAS_STATS
    GradScale,  # fp32 scalar, read when HAS_SCALE
    FoundInf,  # fp32 scalar, read when HAS_FOUND_INF
    Out,  # (4,) fp32: grad_mult, found_inf, grad_norm, 0
    max_grad_norm,  # fp32; clipping when > 0
    HAS_STATS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):
    # csrc/step_control.h, in the same fp32 operations
    inv_scale = tl.full((), 1.0, tl.float32)
    if HAS_SCALE:
        inv_scale = (1.0 / tl.load(GradScale).to(tl.float64)).to(tl.float32)
    found = tl.full((), 0.0, tl.float32)
    if HAS_FOUND_INF:
        found = tl.load(FoundInf)
    norm = tl.full((), 0.0, tl.float32)
    if HAS_STATS:
        found = tl.maximum(found, tl.load(Stats + 1), propagate_nan=tl.PropagateNan.ALL)
        norm = tl.sqrt_rn(tl.load(Stats)) * inv_scale
    mult = inv_scale
    if max_grad_norm > 0:
        clip = tl.div_rn(1.0, norm + 1e-6) * max_grad_norm  # as torch evaluates float / tensor
        mult = inv_scale * tl.where(clip > 1.0, 1.0, clip)
    tl.store(Out, mult)
    tl.store(Out + 1, found)
    tl.store(Out + 2, norm)
    tl.store(Out + 3, 0.0)


def step_control(stats, grad_scale, found_inf, max_grad_norm, out) -> None:
    """The Triton backend of pyeff.ops.step_control."""
    _step_control_kernel[(1,)](
        stats if stats is not None else out, grad_scale if grad_scale is not None else out,
        found_inf if found_inf is not None else out, out, float(max_grad_norm), HAS_STATS=stats is not None,
        HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, **T.launch_options())
    T.bump_versions([out])
