"""Compressed optimizer state in plain torch: the reference of NOTE [compressed optimizer state]
(csrc/state_codec.h) and NOTE [random bits] (csrc/random_bits.h), the same integer and fp32
operations in the same order, so that the kernels' codes are these bits.

The optimizer ops use the helpers below on each tensor's elements in memory order. Two ops stand
alone, for checkpoints (quantizing a torch.optim checkpoint, exporting an fp32 one) and to test
the kernels' codec directly:

- ``quantize_state(x, code, seed, step, slot) -> (codes, absmax)``: `code` "int8" (signed blocks,
  exp_avg), "uint8" (unsigned blocks, second moments) or "bfloat16" (absmax empty); rounded to
  nearest even, or stochastically with the bits of NOTE [random bits] for (seed, step, slot)
  when `seed` is given.
- ``dequantize_state(codes, absmax) -> fp32``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._multi_tensor import is_dense
from ._registry import Op

QUANT_BLOCK = 256
M32 = 0xFFFFFFFF
# Which 16 random bits round which stored value (NOTE [random bits]).
SLOT_EXP_AVG, SLOT_EXP_AVG_SQ, SLOT_MAX_EXP_AVG_SQ, SLOT_ADAM_PARAM = 0, 1, 2, 3
SLOT_SUM, SLOT_ADAGRAD_PARAM = 0, 1
_MIN_SCALE = 2.0**-126
CODES = {"int8": (torch.int8, True), "uint8": (torch.uint8, False)}


# ---------------------------------------------------------------- random bits (NOTE [random bits])


def _mul32(x: Tensor, c: int) -> Tensor:
    """x * c mod 2^32 for x in [0, 2^32), without int64 overflow."""
    return (((x & 0xFFFF) * c) + ((((x >> 16) * c) & 0xFFFF) << 16)) & M32


def mix32(x: Tensor) -> Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_key(seed: int, step: Tensor, word: int) -> tuple[Tensor, Tensor]:
    """(k0, k1) of one word of one tensor; `step` (a tensor, on any device) is the step count after
    the increment."""
    lo, hi = seed & M32, (seed >> 32) & M32  # the two's complement halves of the int64 seed
    k = mix32(step.new_full((), lo ^ 0x9E3779B9, dtype=torch.int64))  # a fill on the device: no host copy
    k = mix32(k ^ hi)
    k = mix32(k ^ (step.to(torch.float64).to(torch.int64).reshape(()) & M32))
    k = mix32((k + word * 0x85EBCA6B) & M32)
    return k, mix32(k ^ 0xC2B2AE35)


def random_word(key: tuple[Tensor, Tensor], index: Tensor) -> Tensor:
    k0, k1 = key
    return mix32(mix32((index & M32) ^ k0) ^ ((k1 + (index >> 32)) & M32))


def slot_bits(seed: int, step: Tensor, slot: int, n: int) -> Tensor:
    """The 16 random bits of `slot` for elements 0..n-1 (int64)."""
    index = torch.arange(n, dtype=torch.int64, device=step.device)
    return (random_word(random_key(seed, step, slot // 2), index) >> (16 * (slot % 2))) & 0xFFFF


# ---------------------------------------------------------------- bits of fp32


def _bits(x: Tensor) -> Tensor:
    return x.view(torch.int32).to(torch.int64) & M32


def _float(b: Tensor) -> Tensor:
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


# ---------------------------------------------------------------- bfloat16


def round_bf16(x: Tensor, r16: Tensor | None = None) -> Tensor:
    """fp32 -> bf16, to nearest even (r16 None) or stochastically; NaN -> canonical NaN."""
    b = _bits(x)
    add = r16 if r16 is not None else 0x7FFF + ((b >> 16) & 1)
    out = torch.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, ((b + add) >> 16) & 0xFFFF)
    return torch.where(out >= 2**15, out - 2**16, out).to(torch.int16).view(torch.bfloat16)


# ---------------------------------------------------------------- int8 block codes


def _code(signed: bool):
    bias = 15 if signed else 31
    return dict(bias=bias, one=bias << 3, nan=0x80 if signed else 0xFF, min_normal_bits=(128 - bias) << 23,
                rebias=(127 - bias) << 3, min_normal=2.0 ** (1 - bias), unit=2.0 ** -(bias + 2),
                per_unit=2.0 ** (bias + 2))


def _encode_magnitude(a: Tensor, r16: Tensor | None, signed: bool) -> Tensor:
    c = _code(signed)
    b = _bits(a)
    add = (r16 << 4) if r16 is not None else 0x7FFFF + ((b >> 20) & 1)
    normal = ((b + add) >> 20) - c["rebias"]
    units = torch.clamp(a, max=c["min_normal"]) * c["per_unit"]
    rounded = units + r16.to(torch.float32) * 2.0**-16 if r16 is not None else (units + 2.0**23) - 2.0**23
    sub = rounded.to(torch.int32).to(torch.int64)
    return torch.where(b >= c["min_normal_bits"], normal, sub).clamp(max=c["one"])


def encode(x: Tensor, signed: bool, r16: Tensor | None = None) -> Tensor:
    """Codes (int64 in [0, 256)) of fp32 x = value / absmax."""
    b = _bits(x)
    a = b & 0x7FFFFFFF
    if signed:
        bad = a >= 0x7F800000
        mag = _encode_magnitude(_float(torch.where(bad, 0, a)), r16, True)
        code = mag | torch.where(((b >> 31) != 0) & (mag != 0), 0x80, 0)
        return torch.where(bad, 0x80, code)
    bad = torch.where((b >> 31) != 0, a != 0, a >= 0x7F800000)
    code = _encode_magnitude(_float(torch.where(bad, 0, a)), r16, False)
    code = torch.where((a != 0) & (code == 0), 1, code)
    return torch.where(bad, 0xFF, code)


def decode(code: Tensor, signed: bool) -> Tensor:
    """fp32 x of codes (any integer dtype holding 0..255 or the int8 bits)."""
    c = _code(signed)
    code = code.to(torch.int64) & 0xFF
    mag = code & 0x7F if signed else code
    normal = _float((mag + c["rebias"]) << 20)
    sub = mag.to(torch.int32).to(torch.float32) * c["unit"]
    x = torch.where(mag >= 8, normal, sub)
    if signed:
        x = torch.where((code & 0x80) != 0, -x, x)
    return torch.where(code == c["nan"], float("nan"), x)


def _blocks(n: int) -> int:
    return -(-n // QUANT_BLOCK)


def _per_element(per_block: Tensor, n: int) -> Tensor:
    return per_block.repeat_interleave(QUANT_BLOCK)[:n]


def dequantize_flat(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """Values of a flat run of codes (memory order) with their blocks' absmax."""
    return decode(codes, signed) * _per_element(absmax.to(torch.float32), codes.numel())


def quantize_flat(values: Tensor, signed: bool, r16: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(codes as int64, absmax) of a flat run of fp32 values (memory order)."""
    n = values.numel()
    finite = torch.where(torch.isfinite(values), values.abs(), 0.0)
    padded = torch.nn.functional.pad(finite, (0, _blocks(n) * QUANT_BLOCK - n))
    absmax = padded.view(-1, QUANT_BLOCK).amax(dim=1).clamp(min=_MIN_SCALE)
    inv = _per_element(1.0 / absmax, n)
    return encode(values * inv, signed, r16), absmax


def to_code_dtype(codes: Tensor, signed: bool) -> Tensor:
    """int64 codes 0..255 as stored: int8 (their bits) or uint8."""
    return (torch.where(codes >= 128, codes - 256, codes) if signed else codes).to(torch.int8 if signed else torch.uint8)


# ---------------------------------------------------------------- memory order


def memory_order(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's elements in memory order (the order kernels walk)."""
    if t.is_contiguous():
        return t.view(-1)
    dims = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.size(d)), reverse=True)
    return t.permute(dims).reshape(-1)


def store_memory_order(dst: Tensor, flat: Tensor) -> None:
    memory_order(dst).copy_(flat)


# ---------------------------------------------------------------- the standalone ops

QUANTIZE = Op("quantize_state")
DEQUANTIZE = Op("dequantize_state")


def _check_dense(op: str, t: Tensor, name: str) -> None:
    if t.is_sparse or not is_dense(t):
        raise RuntimeError(f"{op}: expected `{name}` to be dense (non-overlapping, no gaps)")


@QUANTIZE.reference
def quantize_state_reference(x: Tensor, code: str, seed: Optional[int], step: int, slot: int) -> Tuple[Tensor, Tensor]:
    if code not in ("int8", "uint8", "bfloat16"):
        raise RuntimeError(f"quantize_state: unknown code `{code}`; expected int8, uint8 or bfloat16")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"quantize_state: expected a float32, bfloat16 or float16 tensor, got {x.dtype}")
    _check_dense("quantize_state", x, "x")
    flat = memory_order(x).to(torch.float32)
    r16 = None if seed is None else slot_bits(seed, torch.full((), step, dtype=torch.int64, device=x.device), slot,
                                                  flat.numel())
    if code == "bfloat16":
        out = torch.empty_like(x, dtype=torch.bfloat16)
        store_memory_order(out, round_bf16(flat, r16))
        return out, torch.empty(0, device=x.device)
    dtype, signed = CODES[code]
    codes, absmax = quantize_flat(flat, signed, r16)
    out = torch.empty_like(x, dtype=dtype)
    store_memory_order(out, to_code_dtype(codes, signed))
    return out, absmax


@QUANTIZE.fake
def _quantize_fake(x, code, seed, step, slot):
    if code == "bfloat16":
        return torch.empty_like(x, dtype=torch.bfloat16), x.new_empty(0, dtype=torch.float32)
    return torch.empty_like(x, dtype=CODES.get(code, (torch.int8,))[0]), x.new_empty(_blocks(x.numel()),
                                                                                    dtype=torch.float32)


@DEQUANTIZE.reference
def dequantize_state_reference(codes: Tensor, absmax: Tensor) -> Tensor:
    _check_dense("dequantize_state", codes, "codes")
    if codes.dtype == torch.bfloat16:
        return codes.to(torch.float32)
    if codes.dtype not in (torch.int8, torch.uint8):
        raise RuntimeError(f"dequantize_state: expected int8, uint8 or bfloat16 codes, got {codes.dtype}")
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() != _blocks(codes.numel()):
        raise RuntimeError(f"dequantize_state: expected `absmax` to be a float32 vector of {_blocks(codes.numel())} "
                           f"blocks for {codes.numel()} codes, got {absmax.dtype} {tuple(absmax.shape)}")
    out = torch.empty_like(codes, dtype=torch.float32)
    store_memory_order(out, dequantize_flat(memory_order(codes), absmax, codes.dtype == torch.int8))
    return out


@DEQUANTIZE.fake
def _dequantize_fake(codes, absmax):
    return torch.empty_like(codes, dtype=torch.float32)


def quantize_state(x: Tensor, code: str, *, seed: int | None = None, step: int = 0, slot: int = 0,
                   backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of x in `code` ("int8", "uint8" or "bfloat16"); see the module docstring."""
    return QUANTIZE(QUANTIZE.choose(x.device, backend), x, code, seed, step, slot)


def dequantize_state(codes: Tensor, absmax: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """fp32 values of stored state (int8/uint8 codes with their absmax, or bf16)."""
    if absmax is None:
        absmax = torch.empty(0, device=codes.device)
    return DEQUANTIZE(DEQUANTIZE.choose(codes.device, backend), codes, absmax)


# ---------------------------------------------------------------- the optimizer references' state I/O


def load_moment(t: Tensor, absmax: Tensor | None, signed: bool, acc: torch.dtype) -> Tensor:
    """A moment's elements in memory order, in the math dtype (int8/uint8 codes dequantized)."""
    if t.dtype in (torch.int8, torch.uint8):
        return dequantize_flat(memory_order(t), absmax, signed).to(acc)
    return memory_order(t).to(acc, copy=True)


def store_moment(commit, t: Tensor, absmax: Tensor | None, value: Tensor, signed: bool,
                 r16: Tensor | None) -> None:
    """Write a moment's new elements (memory order, math dtype) in its storage format: codes and
    absmax, bf16 rounded stochastically when r16 is given, else rounded to nearest even."""
    if t.dtype in (torch.int8, torch.uint8):
        codes, new_absmax = quantize_flat(value.to(torch.float32), signed, r16)
        commit(memory_order(t), to_code_dtype(codes, signed))
        commit(absmax, new_absmax)
    elif t.dtype == torch.bfloat16 and r16 is not None:
        commit(memory_order(t), round_bf16(value.to(torch.float32), r16))
    else:
        commit(memory_order(t), value)


def rounding_bits(rng_seeds: list[int], i: int, step: Tensor, n: int):
    """slot -> the 16 random bits of tensor i's elements for that slot (None: round to nearest even)."""
    if not rng_seeds:
        return lambda slot: None
    return lambda slot: slot_bits(rng_seeds[i], step, slot, n)
