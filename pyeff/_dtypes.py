"""The math dtype, one rule for every op and kernel: float64 tensors compute in float64, the others
(float32, bfloat16, float16) in float32, as torch's opmath."""

from __future__ import annotations

import torch


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
