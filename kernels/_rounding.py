"""Rounding on store, shared by the Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """fp32 `x` cast to DTYPE with round-to-nearest-even. The bf16 case rounds with integer bit
    operations, because Triton's interpreter truncates fp32 -> bf16 (the GPU rounds; the result is
    the same bits there, as torch's)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        y = x.to(DTYPE)
    return y
