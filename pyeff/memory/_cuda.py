"""The caching pool as a CUDA allocator (csrc/allocator/cuda_pool.cu, NOTE [CUDA pool streams and
graphs] in cuda_pool.h). It is compiled into pyeff._C when torch has CUDA and nvcc is found at
build time. Two ways to use it:

    pyeff.memory.use_cuda_pool()              # torch's CUDA allocator, before CUDA is first used
    x = torch.randn(1 << 20, device="cuda")   # from the pool; record_stream, CUDA graphs,
    torch.cuda.memory_stats()                 # empty_cache, statistics and OOM errors as torch's

or, for some allocations only, a torch.cuda.MemPool whose segments it serves (torch's allocator
places tensors inside them and keeps its own stream and graph rules):

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
    """The pool's malloc and free as a torch.cuda.memory.CUDAPluggableAllocator, for a
    torch.cuda.MemPool (one per process)."""
    _require_cuda()
    path = _library_path()
    _library(path)
    return torch.cuda.memory.CUDAPluggableAllocator(path, ALLOC_FN, FREE_FN)


def cuda_pool_active() -> bool:
    """Whether use_cuda_pool() made the pool torch's CUDA allocator."""
    return _ext.built_with_cuda() and bool(torch.ops.pyeff.cuda_pool_installed())


def use_cuda_pool() -> None:
    """Make the pool torch's CUDA allocator for the rest of the process (NOTE [CUDA pool as torch's
    allocator], csrc/allocator/cuda_allocator.cpp). torch allows this only before CUDA is first used."""
    _require_cuda()
    if not _ext.built_with_cuda():
        raise RuntimeError("pyeff._C was built without the CUDA pool: build pyeff against a torch with CUDA, with "
                           "nvcc on the PATH (see README.md)")
    try:
        torch.ops.pyeff.cuda_pool_install()
    except RuntimeError as e:
        if "initialized allocator" not in str(e):
            raise
        raise RuntimeError("pyeff.memory.use_cuda_pool() must come before CUDA is first used in the process (torch's "
                           "own CUDA allocator is already in use)") from e


def cuda_mem_pool() -> torch.cuda.MemPool:
    """A torch.cuda.MemPool whose memory comes from the pool, for `torch.cuda.use_mem_pool`."""
    if cuda_pool_active():
        raise RuntimeError("`pyeff.memory.cuda_mem_pool()` after `pyeff.memory.use_cuda_pool()`: the pool already "
                           "serves every CUDA allocation, and torch cannot make a MemPool under another allocator; "
                           "use one or the other")
    return torch.cuda.MemPool(cuda_allocator().allocator())


def cuda_stats(device: int | None = None, library: str | None = None) -> collections.OrderedDict[str, int]:
    """Statistics of the CUDA pool, keyed as pyeff.memory.stats(), for one device (default: all),
    summed over its pools (one per stream, and per stream of each CUDA graph)."""
    lib = _library(library)
    n = lib.pyeff_cuda_pool_num_stats()
    names = [lib.pyeff_cuda_pool_stat_name(i).decode() for i in range(n)]
    values = (ctypes.c_int64 * n)()
    lib.pyeff_cuda_pool_stats(-1 if device is None else int(device), values, n)
    return collections.OrderedDict(sorted(zip(names, values)))


def cuda_empty_cache(library: str | None = None) -> None:
    """Return the CUDA pool's free memory to the driver (cudaFree), after waiting for the streams that
    still use freed blocks; graphs' private pools keep theirs while a graph uses them. With the pool
    as torch's allocator, torch.cuda.empty_cache() does the same."""
    if not _library(library).pyeff_cuda_pool_empty_cache():
        raise RuntimeError("pyeff.memory.cuda_empty_cache() during a CUDA graph capture: no memory can be returned "
                           "while a capture is underway; call it before or after the capture")


def cuda_set_max_cached_bytes(max_cached_bytes: int | None, library: str | None = None) -> None:
    """Cap on the free memory each (device, stream) pool keeps outside CUDA graphs; None: no cap."""
    if max_cached_bytes is not None and max_cached_bytes < 0:
        raise ValueError(f"Invalid max_cached_bytes: {max_cached_bytes}")
    _library(library).pyeff_cuda_pool_set_max_cached_bytes(-1 if max_cached_bytes is None else max_cached_bytes)
