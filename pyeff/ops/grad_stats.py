"""grad_stats: one read-only pass over gradients giving what the mixed-precision step needs.

Contract: for tensors g_1..g_n (any floating dtypes, one device), write into the float32 tensor
``out`` of two elements on that device ``[sum_i sum_j g_ij**2, any_nonfinite]``, with squares
summed at fp32 or better (the kernels keep a double total) in a fixed order, so that the result is
the same bits on every run, and ``any_nonfinite`` 1.0 if any element is inf or NaN, else 0.0.
From it pyeff.ops.step_control derives the overflow flag and the global L2 norm, which equals
``torch.nn.utils.clip_grad_norm_``'s total norm, without a host-device synchronisation.
"""

from __future__ import annotations

from typing import List  # schemas: torch < 2.7 cannot read list[Tensor]

import torch
from torch import Tensor

from ._multi_tensor import is_dense
from ._registry import Op

GRAD_STATS = Op("grad_stats", mutates_args=("out",))


@GRAD_STATS.reference
def grad_stats_reference(grads: List[Tensor], out: Tensor) -> None:
    sumsq = torch.zeros((), dtype=torch.float64, device=out.device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=out.device)
    for g in grads:
        g64 = g.detach().to(torch.float64)
        sumsq += g64.square().sum()
        nonfinite |= ~torch.isfinite(g64).all()
    out.copy_(torch.stack([sumsq.float(), nonfinite.float()]))


@GRAD_STATS.impl("triton", checked=True)
def grad_stats_triton(grads: List[Tensor], out: Tensor) -> None:
    from pyeff.kernels.grad_stats import grad_stats

    GRAD_STATS.check(grads, out)
    grad_stats(grads, out)


def grad_stats(grads: list[Tensor], *, out: Tensor | None = None, backend: str | None = None) -> Tensor:
    """float32 ``[sum of squares, any non-finite]`` over all `grads`, written into `out` (a float32
    tensor of two elements, by default a new one on the first gradient's device) and returned.

    Sparse gradients count their coalesced values. Gradients on several devices are reduced per
    device and combined without a sync.
    """
    if not grads:
        raise ValueError("grad_stats: expected at least one gradient")
    if out is None:
        out = torch.empty(2, dtype=torch.float32, device=grads[0].device)
    elif out.dtype != torch.float32 or out.shape != (2,):
        raise ValueError(f"grad_stats: expected `out` to be a float32 tensor of shape (2,), got {out.dtype} "
                         f"{tuple(out.shape)}")
    per_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        if g.is_sparse:
            g = g.coalesce()._values()
        per_device.setdefault(g.device, []).append(g if is_dense(g) else g.contiguous())
    if len(per_device) == 1 and out.device in per_device:  # the common case: straight into `out`
        GRAD_STATS(GRAD_STATS.choose(out.device, backend), per_device[out.device], out)
        return out
    total = None
    for device, gs in per_device.items():
        part = torch.empty(2, dtype=torch.float32, device=device)
        GRAD_STATS(GRAD_STATS.choose(device, backend), gs, part)
        part = part.to(out.device, non_blocking=True)
        total = part if total is None else torch.stack([total[0] + part[0], torch.maximum(total[1], part[1])])
    return out.copy_(total)
