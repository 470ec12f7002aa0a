"""Rounding on store and the math dtype, shared by the Triton kernels."""

import torch
import triton
import triton.language as tl

from .._dtypes import opmath_dtype


def tl_opmath(dtype: torch.dtype):
    """opmath_dtype(dtype) as a Triton dtype, for a kernel's ACC argument."""
    return tl.float64 if opmath_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """fp32 `x` cast to DTYPE with round-to-nearest-even, NaN kept NaN, as torch's .to(DTYPE).

    The bf16 case rounds with integer bit operations and reinterprets the top half, because Triton's
    interpreter converts fp32 -> bf16 wrongly (it truncates, and mangles denormals; the GPU rounds:
    the result is the same bits there). Adding the rounding bias to a
    NaN would carry into the sign (the GPU's canonical NaN 0x7FFFFFFF becomes -0.0) or clear a
    payload that lies in the low half: a NaN instead keeps its sign and top bits with the quiet bit set."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x != x, bits | 0x00400000, rounded) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y
