"""Input checks shared by the fused layers: they raise before any kernel runs, with the argument named."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"Invalid {name}: expected a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"Invalid {name} dtype: {t.dtype}; expected float32, float64, bfloat16 or float16")


def check_like(fn: str, name: str, t: Tensor, like: Tensor, like_name: str = "input") -> None:
    """`t` must have `like`'s shape, dtype and device."""
    check_float(name, t)
    if t.shape != like.shape:
        raise ValueError(f"Invalid {name} shape: {tuple(t.shape)}; expected {like_name}'s shape {tuple(like.shape)}")
    if t.dtype != like.dtype:
        raise ValueError(f"Invalid {name} dtype: {t.dtype}; expected {like_name}'s dtype {like.dtype}")
    check_device(fn, name, t, like)


def check_device(fn: str, name: str, t: Tensor, like: Tensor) -> None:
    if t.device != like.device:
        raise RuntimeError(f"pyeff.nn.functional.{fn}: `{name}` is on {t.device} but `input` is on {like.device}; "
                           "move them to one device")


def param_for(fn: str, name: str, p: Tensor | None, x: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """A weight/bias as the kernels take it: of `shape`, on x's device, in x's dtype or float32 for
    bfloat16/float16 x. Other dtypes are cast to x's dtype (autograd flows through the cast)."""
    if p is None:
        return None
    check_float(name, p)
    if tuple(p.shape) != shape:
        raise ValueError(f"Invalid {name} shape: {tuple(p.shape)}; expected {shape}")
    check_device(fn, name, p, x)
    low = x.dtype in (torch.bfloat16, torch.float16)
    if p.dtype != x.dtype and not (low and p.dtype == torch.float32):
        p = p.to(x.dtype)
    return p
