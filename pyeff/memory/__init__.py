"""pyeff.memory: a caching memory pool for CPU tensors, its statistics, a CUDA pluggable pool, and
flat parameter buffers.

PyTorch's CPU tensors come from plain malloc: a large activation freed and allocated again every
step goes back to the operating system and faults its pages in again. The pool (csrc/allocator/,
NOTE [caching pool] in pool.h) keeps freed blocks mapped and hands them out again:

    pyeff.memory.enable()                 # every new CPU tensor now comes from the pool
    ...
    print(pyeff.memory.memory_summary())
    pyeff.memory.disable()                # back to torch's allocator; the cache is returned

    with pyeff.memory.pool(max_cached_bytes=2 << 30):
        train()

Tensors allocated before enable() are freed by torch's allocator and pool tensors still alive
after disable() return to the pool when they die (NOTE [switching the CPU allocator] in
cpu_allocator.cpp). The cap on cached memory comes from `max_cached_bytes` (enable(), pool(),
set_max_cached_bytes()), else from the environment variable PYEFF_MEMORY_MAX_CACHED (bytes, or
with a unit: "512MiB", "2GB"; "none" for no cap), else there is none.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re

import torch

from .. import _ext
from ._cuda import (cuda_allocator, cuda_empty_cache, cuda_mem_pool, cuda_pool_active, cuda_set_max_cached_bytes,
                    cuda_stats, use_cuda_pool)
from ._flat import FlatBuffer, FlatParameters, flat_view, flat_zeros_like, flatten_parameters

__all__ = [
    "enable", "disable", "is_enabled", "pool", "stats", "reset_peak_stats", "reset_accumulated_stats",
    "memory_summary", "empty_cache", "set_max_cached_bytes", "max_cached_bytes", "in_pool", "size_classes",
    "ENV_MAX_CACHED",
    "flatten_parameters", "FlatParameters", "FlatBuffer", "flat_view", "flat_zeros_like",
    "cuda_allocator", "use_cuda_pool", "cuda_pool_active", "cuda_mem_pool", "cuda_stats", "cuda_empty_cache",
    "cuda_set_max_cached_bytes",
]

ENV_MAX_CACHED = "PYEFF_MEMORY_MAX_CACHED"

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}
_env_applied = False


def _ops():
    if not _ext.available():
        raise RuntimeError(f"pyeff.memory needs the compiled extension pyeff._C: {_ext.BUILD_HINT}")
    return torch.ops.pyeff


def parse_bytes(value: str | int | None) -> int | None:
    """Bytes from an int or a string such as "1073741824", "512MiB", "2GB"; None (no cap) for None,
    "none", "" or -1."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value == -1:
            return None
        if value < 0:
            raise ValueError(f"Invalid max_cached_bytes: {value}")
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "-1", "unlimited"):
            return None
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
        if m and m.group(2) in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2)])
    raise ValueError(f"Invalid max_cached_bytes: {value!r}")


def _apply_env() -> None:
    global _env_applied
    if _env_applied:
        return
    value = os.environ.get(ENV_MAX_CACHED)
    if value is not None:
        try:
            cap = parse_bytes(value)
        except ValueError:
            raise ValueError(f"Invalid {ENV_MAX_CACHED}: {value!r}; expected bytes, e.g. 1073741824, 512MiB or "
                             "2GB, or none") from None
        _ops().memory_set_max_cached_bytes(-1 if cap is None else cap)
    _env_applied = True


def set_max_cached_bytes(max_cached_bytes: int | str | None) -> None:
    """Cap the free memory the pool keeps (None: no cap); the excess goes back to the OS now."""
    cap = parse_bytes(max_cached_bytes)
    global _env_applied
    _env_applied = True  # an explicit setting wins over the environment
    _ops().memory_set_max_cached_bytes(-1 if cap is None else cap)


def max_cached_bytes() -> int | None:
    """The cap on cached (free) memory in bytes, or None when there is none."""
    _apply_env()
    cap = _ops().memory_max_cached_bytes()
    return None if cap < 0 else cap


def enable(max_cached_bytes: int | str | None = ...) -> bool:
    """Make the pool torch's CPU allocator. Returns False if it already was. `max_cached_bytes`
    (bytes, a string like "2GiB", or None for no cap) sets the cap; left out, the cap stays as set
    before, or as PYEFF_MEMORY_MAX_CACHED says."""
    if max_cached_bytes is not ...:
        set_max_cached_bytes(max_cached_bytes)
    else:
        _apply_env()
    return bool(_ops().memory_enable())


def disable() -> bool:
    """Put back the CPU allocator that was installed before enable() and return the cache to the
    OS; pool tensors still alive go back to the OS when they die. Returns False if not enabled."""
    return bool(_ops().memory_disable())


def is_enabled() -> bool:
    return _ext.available() and bool(torch.ops.pyeff.memory_is_enabled())


@contextlib.contextmanager
def pool(max_cached_bytes: int | str | None = ...):
    """Context manager: the pool is torch's CPU allocator inside the block (if it was enabled
    already, it stays enabled after)."""
    enabled_here = enable(max_cached_bytes)
    try:
        yield
    finally:
        if enabled_here:
            disable()


def empty_cache() -> None:
    """Return every free segment (slab or large block) to the OS."""
    _ops().memory_empty_cache()


def stats() -> collections.OrderedDict[str, int]:
    """The pool's statistics, keyed like torch.cuda.memory_stats():

    - ``{allocated_bytes, requested_bytes, reserved_bytes, allocation, segment}.{all, small_pool,
      large_pool}.{current, peak, allocated, freed}``: bytes handed out (rounded to the block
      size), bytes asked for, bytes mapped from the OS, number of blocks handed out (``allocated``
      counts allocations, ``freed`` frees), number of OS mappings;
    - ``cached_bytes.{all, small_pool, large_pool}.{current, peak}``: free memory kept (reserved -
      allocated);
    - ``num_cache_hits`` (requests served from memory already reserved), ``num_cache_misses``,
      ``num_os_allocs``, ``num_os_frees`` (mappings made and returned), ``num_os_resizes`` (a
      cached large block grown or shrunk in place of a new mapping), ``num_alloc_retries`` (failed
      mappings that made the pool return its cache and try again), ``num_ooms``.

    Zero-byte tensors take no block and are not counted.
    """
    ops = _ops()
    return collections.OrderedDict(sorted(zip(ops.memory_stat_names(), ops.memory_stats())))


def reset_peak_stats() -> None:
    """Set every peak to its current value."""
    _ops().memory_reset_peak_stats()


def reset_accumulated_stats() -> None:
    """Zero the totals (allocated, freed) and the counters."""
    _ops().memory_reset_accumulated_stats()


def in_pool(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s storage is a live block of the pool."""
    return bool(_ops().memory_owns(tensor))


def size_classes() -> list[int]:
    """The small blocks' size classes in bytes; larger requests get blocks of their own."""
    return list(_ops().memory_size_classes())


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def memory_summary() -> str:
    """The statistics as a table, like torch.cuda.memory_summary()."""
    s = stats()
    cap = max_cached_bytes()
    width = 79
    rule, thick = "|" + "-" * (width - 2) + "|", "|" + "=" * (width - 2) + "|"

    def line(text: str) -> str:
        return f"| {text:<{width - 4}} |"

    out = [thick, line(f"pyeff CPU memory pool ({'enabled' if is_enabled() else 'disabled'}), cap on cached "
                       f"memory: {'none' if cap is None else _fmt_bytes(cap)}"), thick,
           line(f"{'Metric':<26}{'Current':>12}{'Peak':>12}{'Tot alloc':>12}{'Tot freed':>12}"), rule]
    rows = [("Allocated memory", "allocated_bytes", True), ("Requested memory", "requested_bytes", True),
            ("Reserved memory (OS)", "reserved_bytes", True), ("Cached (free) memory", "cached_bytes", True),
            ("Allocations", "allocation", False), ("Segments (OS mappings)", "segment", False)]
    for title, kind, is_bytes in rows:
        fmt = _fmt_bytes if is_bytes else str
        for pool_name, label in (("all", title), ("large_pool", "  from large blocks"),
                                 ("small_pool", "  from size classes")):
            vals = [s.get(f"{kind}.{pool_name}.{m}") for m in ("current", "peak", "allocated", "freed")]
            cells = "".join(f"{'' if v is None else fmt(v):>12}" for v in vals)
            out.append(line(f"{label:<26}{cells}"))
        out.append(rule)
    hits, misses = s["num_cache_hits"], s["num_cache_misses"]
    rate = f"{100 * hits / (hits + misses):.1f} %" if hits + misses else "-"
    out.append(line(f"Cache hits {hits}, misses {misses} (hit rate {rate})"))
    out.append(line(f"OS mappings made {s['num_os_allocs']}, returned {s['num_os_frees']}, resized "
                    f"{s['num_os_resizes']}; failed requests {s['num_ooms']}"))
    out.append(thick)
    return "\n".join(out)
