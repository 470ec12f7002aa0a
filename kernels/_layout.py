"""Memory layout the Triton kernels take: 2-D arrays with contiguous columns and any row stride
(passed to the kernel), so that row views such as x[:, :n] need no copy."""

from __future__ import annotations

import torch


def rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` (rows, n) as is when its columns are contiguous, else a contiguous copy; None stays None."""
    if t is None or t.shape[1] <= 1 or t.stride(1) == 1:
        return t
    return t.contiguous()
