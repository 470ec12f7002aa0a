"""Reading and writing an optimizer's parameter in each NOTE [low-precision parameter modes]
(csrc/cpu/low_precision.h), a block of elements at a time: the Triton twin of csrc/cpu/param_io.h."""

from __future__ import annotations

import triton
import triton.language as tl

from ._rounding import cast_rne


@triton.jit
def load_param(param, master, i, mask, ACC: tl.constexpr, MODE: tl.constexpr):
    """The parameter's elements i, or its fp32 master copy's (MODE 1), in the math type."""
    if MODE == 1:
        p = tl.load(master + i, mask=mask).to(ACC)
    else:
        p = tl.load(param + i, mask=mask).to(ACC)
    return p


@triton.jit
def store_param(param, master, comp, i, mask, p, old, P: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr):
    """Store the updated values p of elements i, whose values before the update were old."""
    if MODE == 1:
        tl.store(master + i, p, mask=mask)
        tl.store(param + i, cast_rne(p, P), mask=mask)
    elif MODE == 2:  # NOTE [compensated summation] (csrc/low_precision_math.h)
        y = (p - old) + tl.load(comp + i, mask=mask).to(ACC)
        rounded = cast_rne(old + y, P)
        tl.store(param + i, rounded, mask=mask)
        tl.store(comp + i, cast_rne(y - (rounded.to(ACC) - old), P), mask=mask)
    else:
        tl.store(param + i, cast_rne(p, P), mask=mask)
