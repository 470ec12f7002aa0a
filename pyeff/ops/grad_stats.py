"""grad_stats: one read-only pass over gradients giving what the mixed-precision step needs.

Contract: for tensors g_1..g_n (any floating dtypes, one device), return a float32 tensor
``[sum_i sum_j g_ij**2, any_nonfinite]`` on that device, with squares summed at fp32 or better
(the kernels keep a double total) and ``any_nonfinite`` 1.0 if any element is inf or NaN, else 0.0.
From it the optimizer derives the overflow flag and the global L2 norm, which equals
``torch.nn.utils.clip_grad_norm_``'s total norm, without a host-device synchronisation.
"""

from __future__ import annotations

from typing import List  # custom_op signatures: torch < 2.7 cannot read list[Tensor]

import torch
from torch import Tensor

from ._multi_tensor import is_dense
from ._registry import Op

GRAD_STATS = Op("grad_stats")


@GRAD_STATS.register("reference")
def grad_stats_reference(grads: list[Tensor]) -> Tensor:
    device = grads[0].device
    sumsq = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    for g in grads:
        g64 = g.detach().to(torch.float64)
        sumsq += g64.square().sum()
        nonfinite |= ~torch.isfinite(g64).all()
    return torch.stack([sumsq.float(), nonfinite.float()])


@GRAD_STATS.register("cpu")
def grad_stats_cpu(grads: list[Tensor]) -> Tensor:
    return torch.ops.pyeff.grad_stats_cpu(grads)


@torch.library.custom_op("pyeff::grad_stats", mutates_args=())
def _grad_stats_op(grads: List[Tensor], backend: str) -> Tensor:
    return GRAD_STATS(backend, grads)


@_grad_stats_op.register_fake
def _(grads, backend):
    return grads[0].new_empty((2,), dtype=torch.float32)


def grad_stats(grads: list[Tensor], *, backend: str | None = None) -> Tensor:
    """float32 ``[sum of squares, any non-finite]`` over all `grads`, on the first one's device.

    Gradients on several devices are reduced per device and combined without a sync.
    """
    if not grads:
        raise ValueError("grad_stats: expected at least one gradient")
    per_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        if g.is_sparse:
            g = g.coalesce()._values()
        per_device.setdefault(g.device, []).append(g if is_dense(g) else g.contiguous())
    first = grads[0].device
    out = None
    for device, gs in per_device.items():
        stats = GRAD_STATS.run(_grad_stats_op, GRAD_STATS.choose(device, backend), gs).to(first, non_blocking=True)
        out = stats if out is None else torch.stack([out[0] + stats[0], torch.maximum(out[1], stats[1])])
    return out
