"""scale_grad_stats: dst = src * scale in one pass that also yields grad_stats of dst.

Contract: `src` and `dst` are contiguous tensors of the same number of elements on one device,
float32, bfloat16 or float16 in any pair (or both float64); `dst` may be `src` itself, and must not
otherwise overlap it. Writes ``dst = src * scale`` (math in fp32, fp64 for fp64; rounded to dst's
dtype to nearest even) and into the float32 tensor ``out`` of two elements ``[sum of dst**2, any
element of dst non-finite]``, exactly what ``grad_stats([dst])`` would find after the write (NOTE
[grad stats during the all-reduce] in pyeff/distributed/comm_hook.py: the DDP comm hook averages a
reduced bucket with it). Backends: the C++ CPU kernel; the reference (a few passes) elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._dtypes import opmath_dtype
from ._registry import Op
from .grad_stats import grad_stats_reference

SCALE_GRAD_STATS = Op("scale_grad_stats", mutates_args=("dst", "out"))

_SINGLE_OR_LOW = (torch.float32, torch.bfloat16, torch.float16)


@SCALE_GRAD_STATS.reference
def scale_grad_stats_reference(src: Tensor, dst: Tensor, scale: float, out: Tensor) -> None:
    acc = opmath_dtype(src.dtype)
    dst.copy_((src.to(acc) * scale).view(dst.shape))
    grad_stats_reference([dst], out)


def scale_grad_stats(src: Tensor, dst: Tensor, scale: float, *, out: Tensor | None = None,
                     backend: str | None = None) -> Tensor:
    """``dst.copy_(src * scale)``; writes float32 [sum of squares, any non-finite] of dst into `out`
    (by default a new tensor on dst's device) and returns it. See the module docstring."""
    pair = (src.dtype, dst.dtype)
    if not (all(d in _SINGLE_OR_LOW for d in pair) or pair == (torch.float64, torch.float64)):
        raise RuntimeError(f"scale_grad_stats: expected src and dst to be float32, bfloat16 or float16 (or both "
                           f"float64), got {src.dtype} and {dst.dtype}")
    if src.numel() != dst.numel() or src.device != dst.device:
        raise RuntimeError(f"scale_grad_stats: expected dst like src ({src.numel()} elements on {src.device}), got "
                           f"{dst.numel()} on {dst.device}")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise RuntimeError("scale_grad_stats: expected src and dst to be contiguous")
    if src.data_ptr() != dst.data_ptr() and src.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr():
        raise RuntimeError("scale_grad_stats: src and dst share storage without being the same elements")
    if out is None:
        out = torch.empty(2, dtype=torch.float32, device=dst.device)
    SCALE_GRAD_STATS(SCALE_GRAD_STATS.choose(dst.device, backend), src, dst, float(scale), out)
    return out
