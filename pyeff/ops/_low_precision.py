"""What the reference optimizers share: the skip of a step (NOTE [overflow skip]), the learning
rate, the gradient in the math dtype, and the last write, the updated parameter back into its
storage in each mode of NOTE [low-precision parameter modes] (csrc/cpu/low_precision.h)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def committer(found_inf: Tensor | None) -> Callable[[Tensor, Tensor], None]:
    """commit(dst, new): dst takes new, or keeps its value where found_inf is set (decided on the
    device, without a sync: a skipped step writes back the old values)."""
    skip = None if found_inf is None else found_inf != 0

    def commit(dst: Tensor, new: Tensor) -> None:
        dst.copy_(new if skip is None else torch.where(skip, dst, new))

    return commit


def learning_rate_value(lr: float, lr_tensor: Tensor | None) -> float | Tensor:
    """The learning rate in double, as torch.optim computes from a Python float."""
    return lr if lr_tensor is None else lr_tensor.to(torch.float64).reshape(())


def math_grad(grad: Tensor, acc: torch.dtype, grad_mult: Tensor | None, maximize: bool) -> Tensor:
    """The gradient in the math dtype, unscaled and clipped (NOTE [mixed-precision step]), negated
    if maximizing."""
    g = grad.to(acc)
    if grad_mult is not None:
        g = g * grad_mult.to(acc)
    return -g if maximize else g


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
