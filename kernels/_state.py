"""Compressed optimizer state in the Triton kernels: the same integer and fp32 operations as
csrc/state_codec.h (NOTE [compressed optimizer state]) and csrc/random_bits.h (NOTE [random
bits]), so that the codes and the stochastically rounded values are those of the CPU and CUDA
kernels. uint32 arithmetic wraps as in C++."""

import triton
import triton.language as tl

from . import _optim
from ._rounding import cast_rne
from ._tables import div_ieee

QUANT_BLOCK = tl.constexpr(256)  # a constexpr: compiled kernels read no other kind of global


@triton.jit
def _u32(c):
    return tl.full((), c, tl.uint32)


@triton.jit
def mix32(x):
    """lowbias32 of uint32 x."""
    x = x ^ (x >> 16)
    x = x * _u32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * _u32(0x846CA68B)
    return x ^ (x >> 16)


@triton.jit
def random_key(seed, step, WORD: tl.constexpr):
    """(k0, k1) of random word WORD of a tensor (int64 `seed`) at `step` (its count after the increment)."""
    s = seed.to(tl.uint64, bitcast=True)
    k = mix32(s.to(tl.uint32) ^ _u32(0x9E3779B9))
    k = mix32(k ^ (s >> 32).to(tl.uint32))
    k = mix32(k ^ step.to(tl.int64).to(tl.uint64, bitcast=True).to(tl.uint32))
    k = mix32(k + _u32(WORD * 0x85EBCA6B % 4294967296))
    return k, mix32(k ^ _u32(0xC2B2AE35))


@triton.jit
def slot_bits(k0, k1, index, SLOT: tl.constexpr):
    """The 16 random bits of SLOT for the elements at `index` (int64) of a tensor."""
    u = index.to(tl.uint64, bitcast=True)
    word = mix32(mix32(u.to(tl.uint32) ^ k0) ^ (k1 + (u >> 32).to(tl.uint32)))
    return (word >> (16 * (SLOT % 2))) & 0xFFFF


@triton.jit
def bf16_stochastic(x, r16):
    """fp32 x rounded to bf16 with 16 random bits (NaN: the canonical NaN)."""
    b = x.to(tl.uint32, bitcast=True)
    out = tl.where((b & 0x7FFFFFFF) > 0x7F800000, _u32(0x7FC00000), (b + r16) & _u32(0xFFFF0000))
    return (out >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _encode_magnitude(b, r16, SIGNED: tl.constexpr, STOCHASTIC: tl.constexpr):
    BIAS: tl.constexpr = 15 if SIGNED else 31
    MIN_NORMAL_BITS: tl.constexpr = (128 - BIAS) << 23
    REBIAS: tl.constexpr = (127 - BIAS) << 3
    PER_UNIT: tl.constexpr = 131072.0 if SIGNED else 8589934592.0  # 2^17, 2^33
    if STOCHASTIC:
        add = r16 << 4
    else:
        add = 0x7FFFF + ((b >> 20) & 1)
    normal = ((b + add) >> 20) - REBIAS
    units = tl.minimum(b, _u32(MIN_NORMAL_BITS)).to(tl.float32, bitcast=True) * PER_UNIT
    if STOCHASTIC:
        rounded = units + r16.to(tl.int32).to(tl.float32) * 0.0000152587890625  # 2^-16
    else:
        rounded = (units + 8388608.0) - 8388608.0
    sub = rounded.to(tl.int32).to(tl.uint32)
    code = tl.where(b >= MIN_NORMAL_BITS, normal, sub)
    return tl.minimum(code, _u32(BIAS << 3))


@triton.jit
def encode_signed(x, r16, STOCHASTIC: tl.constexpr):
    """uint8 code of fp32 x = value / absmax (exp_avg's signed E4M3 code)."""
    b = x.to(tl.uint32, bitcast=True)
    a = b & 0x7FFFFFFF
    finite = a < 0x7F800000
    mag = _encode_magnitude(tl.where(finite, a, 0), r16, True, STOCHASTIC)
    sign = tl.where(mag != 0, (b >> 24) & 0x80, 0)
    return tl.where(finite, mag | sign, 0x80).to(tl.uint8)


@triton.jit
def encode_unsigned(x, r16, STOCHASTIC: tl.constexpr):
    """uint8 code of fp32 x = value / absmax (the second moments' unsigned E5M3 code)."""
    b = x.to(tl.uint32, bitcast=True)
    a = b & 0x7FFFFFFF
    bad = (b > 0x80000000) | (a >= 0x7F800000)
    code = _encode_magnitude(tl.where(bad, 0, a), r16, False, STOCHASTIC)
    code = tl.maximum(code, (a != 0).to(tl.uint32))
    return tl.where(bad, 0xFF, code).to(tl.uint8)


@triton.jit
def decode(c, SIGNED: tl.constexpr):
    """fp32 value / absmax of uint8 codes c."""
    BIAS: tl.constexpr = 15 if SIGNED else 31
    REBIAS: tl.constexpr = (127 - BIAS) << 3
    code = c.to(tl.uint32)
    if SIGNED:
        mag = code & 0x7F
    else:
        mag = code
    whole = mag.to(tl.int32).to(tl.float32).to(tl.uint32, bitcast=True)
    sub = tl.where(mag != 0, whole - ((BIAS + 2) << 23), 0)
    bits = tl.where(mag >= 8, (mag + REBIAS) << 20, sub)
    if SIGNED:
        bits = bits | ((code & 0x80) << 24)
    return tl.where(code == (0x80 if SIGNED else 0xFF), _u32(0x7FC00000), bits).to(tl.float32, bitcast=True)


@triton.jit
def block_absmax(x, mask):
    """The absmax of each row of a (blocks, QUANT_BLOCK) tile: its largest finite magnitude, at
    least 2^-126."""
    a = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    a = tl.where(mask & (a < 0x7F800000), a, 0).to(tl.int32)
    largest = tl.max(a, axis=1).to(tl.float32, bitcast=True)
    return tl.maximum(largest, 1.1754943508222875e-38)


# ---------------------------------------------------------------- loads and stores of the optimizer kernels


def blocks_per_step(block: int) -> int:
    """int8 blocks a CODED program takes per step of its loop: about BLOCK elements, one block at least."""
    return max(1, block // QUANT_BLOCK.value)


@triton.jit
def block_tile(first, end, QBLOCKS: tl.constexpr):
    """(blocks, i, mask, bmask): QBLOCKS whole int8 blocks from element `first` (a multiple of
    QUANT_BLOCK) as a (QBLOCKS, QUANT_BLOCK) tile of element indices, and which exist below `end`."""
    blocks = first // QUANT_BLOCK + tl.arange(0, QBLOCKS)
    i = blocks[:, None] * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)[None, :]
    return blocks, i, i < end, blocks * QUANT_BLOCK < end


@triton.jit
def load_codes(codes, absmax, i, blocks, mask, bmask, SIGNED: tl.constexpr):
    """A tile of int8-coded moments in fp32."""
    scale = tl.load(absmax + blocks, mask=bmask, other=0.0)
    return decode(tl.load(codes + i, mask=mask, other=0), SIGNED) * scale[:, None]


@triton.jit
def store_codes(codes, absmax, i, blocks, mask, bmask, x, SIGNED: tl.constexpr, SR: tl.constexpr, k0, k1,
                SLOT: tl.constexpr):
    """Store a tile of fp32 moments as int8 codes with each block's absmax, rounded to nearest even
    or, when SR, stochastically with the bits of SLOT."""
    scale = block_absmax(x, mask)
    x = x * div_ieee(tl.full(scale.shape, 1.0, tl.float32), scale)[:, None]
    r16 = tl.zeros(x.shape, tl.uint32)
    if SR:
        r16 = slot_bits(k0, k1, i.to(tl.int64), SLOT)
    if SIGNED:
        c = encode_signed(x, r16, SR)
    else:
        c = encode_unsigned(x, r16, SR)
    tl.store(codes + i, c, mask=mask)
    tl.store(absmax + blocks, scale, mask=bmask)


@triton.jit
def store_rounded(ptr, i, mask, x, DTYPE: tl.constexpr, SR: tl.constexpr, k0, k1, SLOT: tl.constexpr):
    """Store fp32 x as DTYPE: a bf16 value rounded stochastically when SR, else to nearest even."""
    if SR and DTYPE == tl.bfloat16:
        tl.store(ptr + i, bf16_stochastic(x, slot_bits(k0, k1, i.to(tl.int64), SLOT)), mask=mask)
    else:
        tl.store(ptr + i, cast_rne(x, DTYPE), mask=mask)


@triton.jit
def store_param(param, master, comp, i, mask, p, old, P: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr,
                SR: tl.constexpr, k0, k1, SLOT: tl.constexpr):
    """kernels/_optim.store_param, but a bf16 parameter without master weights or compensation
    rounded stochastically when SR."""
    if SR and MODE == 0 and P == tl.bfloat16:
        store_rounded(param, i, mask, p, P, SR, k0, k1, SLOT)
    else:
        _optim.store_param(param, master, comp, i, mask, p, old, P, ACC, MODE)
