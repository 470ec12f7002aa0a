"""The reference optimizers' last write: the updated parameter back into its storage, in each mode
of NOTE [low-precision parameter modes] (csrc/cpu/low_precision.h)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor


def store_param(take: Callable[[Tensor], Tensor], put: Callable[[Tensor, Tensor], None], param: Tensor, p: Tensor,
                master: Tensor | None = None, compensation: Tensor | None = None) -> None:
    """Write the updated parameter `p` (in the math dtype); `take(t)` reads a stored tensor in the
    math dtype, `put(dst, value)` writes one.

    - compensated summation: the parameter takes its old value + update + the carried error,
      rounded once, and `compensation` carries the new rounding error on;
    - an fp32 `master`: the master takes p, the parameter p rounded;
    - otherwise the parameter takes p rounded.
    """
    if compensation is not None:
        old = take(param)
        y = (p - old) + take(compensation)
        rounded = (old + y).to(param.dtype)
        put(compensation, y - (rounded.to(p.dtype) - old))
        put(param, rounded)
        return
    if master is not None:
        put(master, p)
    put(param, p)
