"""scale_grad_stats: dst = src * scale in one pass that also yields grad_stats of dst.

Contract: `src` and `dst` are dense tensors of the same number of elements on one device, float32,
bfloat16 or float16 in any pair (or both float64); `dst` may be `src` itself. Writes
``dst = src * scale`` (math in fp32, fp64 for fp64; rounded to dst's dtype to nearest even) and
returns float32 ``[sum of dst**2, any element of dst non-finite]`` exactly as
``grad_stats([dst])`` would after the write (NOTE [grad stats during the all-reduce] in
pyeff/distributed/comm_hook.py: the DDP comm hook averages a reduced bucket with it).
Backends: the C++ CPU kernel, and the reference (several passes) for any other device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._registry import Op
from .grad_stats import grad_stats_reference

SCALE_GRAD_STATS = Op("scale_grad_stats")

_SINGLE_OR_LOW = (torch.float32, torch.bfloat16, torch.float16)


def _check(src: Tensor, dst: Tensor) -> None:
    """The contract's input rules (the C++ backend checks the same in csrc/scale_grad_stats.cpp)."""
    pair = (src.dtype, dst.dtype)
    if not (all(d in _SINGLE_OR_LOW for d in pair) or pair == (torch.float64, torch.float64)):
        raise RuntimeError(f"scale_grad_stats: expected src and dst to be float32, bfloat16 or float16 (or both "
                           f"float64), got {src.dtype} and {dst.dtype}")
    if src.numel() != dst.numel() or src.device != dst.device:
        raise RuntimeError(f"scale_grad_stats: expected dst like src ({src.numel()} elements on {src.device}), got "
                           f"{dst.numel()} on {dst.device}")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise RuntimeError("scale_grad_stats: expected src and dst to be contiguous")


@SCALE_GRAD_STATS.register("reference")
def scale_grad_stats_reference(src: Tensor, dst: Tensor, scale: float) -> Tensor:
    _check(src, dst)
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32
    dst.copy_((src.to(acc) * scale).view(dst.shape))
    return grad_stats_reference([dst])


@SCALE_GRAD_STATS.register("cpu")
def scale_grad_stats_cpu(src: Tensor, dst: Tensor, scale: float) -> Tensor:
    return torch.ops.pyeff.scale_grad_stats_cpu(src, dst, scale)


def scale_grad_stats(src: Tensor, dst: Tensor, scale: float, *, backend: str | None = None) -> Tensor:
    """``dst.copy_(src * scale)``; returns float32 [sum of squares, any non-finite] of dst (see above)."""
    return SCALE_GRAD_STATS(SCALE_GRAD_STATS.choose(src.device, backend), src, dst, float(scale))
