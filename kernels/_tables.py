"""Host side of the Triton optimizer kernels: argument tables and launch settings.

NOTE [Triton multi-tensor launch]
One launch per (device, dtypes) bucket, as the CUDA kernels (NOTE [multi-tensor launch] in
csrc/cuda/multi_tensor_apply.cuh), with an int64 table in device memory instead of kernel
parameters: a row per tensor (its element count, then the addresses of its arrays and scalars),
and a row per program (chunk): the tensor it updates and its first element. One program per
CHUNK-element chunk. The tables are cached by content: a step whose tensors sit where they sat at
the last step (the usual case, and always under CUDA graph replay) copies and allocates nothing;
otherwise the new tables go to the device from pinned memory without a sync.

NOTE [double scalars]
Triton passes a Python float as fp32, but the optimizers' coefficients are computed in double
(as torch.optim computes them from Python floats) and rounded once. So each double argument is
passed as its 64 bits in an int64 (`bits`) and reinterpreted in the kernel (`kernels/_tables.f64`).
"""

from __future__ import annotations

import struct
from collections import OrderedDict

import torch
import triton
import triton.language as tl

CHUNK = 65536  # elements per program (tests lower it to reach many chunks with small tensors)
BLOCK = 1024  # elements per step of a program's loop
NUM_WARPS = 4
_CACHE_SIZE = 16
_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()


def bits(x: float) -> int:
    """A double's bits as a signed 64-bit int (NOTE [double scalars])."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def f64(b):
    """The double whose bits `bits()` passed (NOTE [double scalars])."""
    return b.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def pow_int(base, n):
    """base ** n in double for an integer n in [0, 2**40) (a step count), by squaring: the
    interpreter has no pow, and a few ulp of a double are far below the fp32 rounding that follows."""
    k = n.to(tl.int64)
    result = tl.full((), 1.0, tl.float64)
    b = base
    for i in tl.static_range(40):
        result = tl.where(((k >> i) & 1) == 1, result * b, result)
        b = b * b
    return result


@triton.jit
def sqrt_ieee(x):
    """Correctly rounded square root (tl.sqrt is approximate in fp32; fp64's is exact)."""
    if x.dtype == tl.float64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def div_ieee(a, b):
    """Correctly rounded division (`/` is approximate in fp32; fp64's is exact)."""
    if a.dtype == tl.float64:
        y = a / b
    else:
        y = tl.div_rn(a, b)
    return y


def tables(rows: list[tuple[int, ...]], work: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(table, chunks, programs) for tensors described by `rows` (one tuple of int64 per tensor)
    with `work` elements each: table is (tensors, len(row)) int64, chunks (programs, 2) int64 rows of
    (tensor index, first element). See NOTE [Triton multi-tensor launch]."""
    key = (device, CHUNK, tuple(rows), tuple(work))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    chunk_rows = [(t, start) for t, n in enumerate(work) for start in range(0, n, CHUNK)]
    table = torch.tensor(rows, dtype=torch.int64)
    chunks = torch.tensor(chunk_rows or [(0, 0)], dtype=torch.int64)
    if device.type != "cpu":
        table = table.pin_memory().to(device, non_blocking=True)
        chunks = chunks.pin_memory().to(device, non_blocking=True)
    hit = _cache[key] = (table, chunks, len(chunk_rows))
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return hit


def address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def addresses(ts: list[torch.Tensor] | None, n: int) -> list[int]:
    """A column of the table: the tensors' addresses, or n zeros where the list is absent (None or
    empty). Built a column at a time: per-row tuples of address() calls cost a millisecond per step
    for a model's few hundred tensors."""
    return [t.data_ptr() for t in ts] if ts else [0] * n


def all_aligned(rows: list[tuple[int, ...]], columns: tuple[int, ...]) -> bool:
    """Whether every address in these columns of the rows is 16-byte aligned (0: an absent array),
    so that the kernel may use 16-byte vector accesses (chunks start at multiples of CHUNK)."""
    return all(row[c] % 16 == 0 for row in rows for c in columns)


def to_tl(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


def launch_options() -> dict:
    """Every backend rounds the same operations (NOTE [kernel numerics flags] in pyeff/_build.py):
    no multiply-add contraction."""
    return dict(num_warps=NUM_WARPS, enable_fp_fusion=False)


def bump_versions(*lists: list[torch.Tensor]) -> None:
    """What ATen's in-place ops do (the C++ kernels too): written tensors get a new version. One
    call for every list (inference tensors, which have no version, are skipped by torch)."""
    torch.autograd.graph.increment_version([t for ts in lists for t in ts])
