"""The caching pool as a CUDA allocator (csrc/allocator/cuda_pool.cu, NOTE [CUDA pool streams]).

Its C functions are compiled into pyeff._C when torch has CUDA and nvcc is found at build time,
and torch.cuda.memory.CUDAPluggableAllocator loads them from that file:

    pyeff.memory.use_cuda_pool()              # before the first CUDA allocation of the process
    x = torch.randn(1 << 20, device="cuda")   # from the pool
    pyeff.memory.cuda_stats()["allocated_bytes.all.current"]

or, for some allocations only, a torch.cuda.MemPool backed by it:

    with torch.cuda.use_mem_pool(pyeff.memory.cuda_mem_pool()):
        y = torch.empty(1 << 20, device="cuda")
"""

from __future__ import annotations

import collections
import ctypes
import functools

import torch

from .. import _ext

ALLOC_FN, FREE_FN = "pyeff_cuda_pool_alloc", "pyeff_cuda_pool_free"


def _library_path() -> str:
    if not _ext.available():
        raise RuntimeError(f"the CUDA pool needs the compiled extension pyeff._C: {_ext.BUILD_HINT}")
    from pyeff import _C

    return _C.__file__


@functools.cache
def _library(path: str | None = None) -> ctypes.CDLL:
    """The shared library holding the pool's C functions (pyeff._C unless `path` is given)."""
    lib = ctypes.CDLL(path or _library_path())
    if not hasattr(lib, ALLOC_FN):
        raise RuntimeError("pyeff._C was built without the CUDA pool: build pyeff against a torch with CUDA, with "
                           "nvcc on the PATH (see README.md), to use `pyeff.memory.cuda_allocator`")
    lib.pyeff_cuda_pool_stat_name.restype = ctypes.c_char_p
    lib.pyeff_cuda_pool_stat_name.argtypes = [ctypes.c_int]
    lib.pyeff_cuda_pool_stats.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    lib.pyeff_cuda_pool_set_max_cached_bytes.argtypes = [ctypes.c_int64]
    return lib


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA pool needs a CUDA device and a torch built with CUDA")


@functools.cache
def cuda_allocator() -> torch.cuda.memory.CUDAPluggableAllocator:
    """The pool as a torch.cuda.memory.CUDAPluggableAllocator (one per process)."""
    _require_cuda()
    path = _library_path()
    _library(path)
    return torch.cuda.memory.CUDAPluggableAllocator(path, ALLOC_FN, FREE_FN)


def use_cuda_pool() -> None:
    """Make the pool torch's CUDA allocator for the rest of the process. torch allows this only
    before its first CUDA allocation (it raises otherwise)."""
    torch.cuda.memory.change_current_allocator(cuda_allocator())


def cuda_mem_pool() -> torch.cuda.MemPool:
    """A torch.cuda.MemPool whose memory comes from the pool, for `torch.cuda.use_mem_pool`."""
    return torch.cuda.MemPool(cuda_allocator().allocator())


def cuda_stats(device: int | None = None, library: str | None = None) -> collections.OrderedDict[str, int]:
    """Statistics of the CUDA pool, keyed as pyeff.memory.stats(), for one device (default: all),
    summed over its streams' pools."""
    lib = _library(library)
    n = lib.pyeff_cuda_pool_num_stats()
    names = [lib.pyeff_cuda_pool_stat_name(i).decode() for i in range(n)]
    values = (ctypes.c_int64 * n)()
    lib.pyeff_cuda_pool_stats(-1 if device is None else int(device), values, n)
    return collections.OrderedDict(sorted(zip(names, values)))


def cuda_empty_cache(library: str | None = None) -> None:
    """Return the CUDA pool's free memory to the driver (cudaFree)."""
    _library(library).pyeff_cuda_pool_empty_cache()


def cuda_set_max_cached_bytes(max_cached_bytes: int | None, library: str | None = None) -> None:
    """Cap on the free memory each (device, stream) pool keeps; None: no cap."""
    if max_cached_bytes is not None and max_cached_bytes < 0:
        raise ValueError(f"Invalid max_cached_bytes: {max_cached_bytes}")
    _library(library).pyeff_cuda_pool_set_max_cached_bytes(-1 if max_cached_bytes is None else max_cached_bytes)
