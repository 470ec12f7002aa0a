"""Shared plumbing of the multi-tensor ops: bucketing by (device, dtype) and dense layouts.

Kernels walk each tensor as one flat array, which needs every tensor at index i (parameter,
gradient, state) to be non-overlapping and dense with the parameter's strides. That is what
torch creates (autograd's gradient layout contract, zeros_like(memory_format=preserve_format)),
so the copies below happen only for unusual layouts (a parameter that is a strided slice, a
gradient assigned by hand in another layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _ext

TensorLists = dict[str, list[Tensor]]


def group_by_device_and_dtype(lists: TensorLists, keys: Sequence[str] = ("params", "grads")) -> dict[tuple, TensorLists]:
    """Split parallel tensor lists into buckets whose tensors share the device of `keys[0]` and the
    dtype of each list in `keys` (a kernel launch is specialised on those).

    Lists that are empty (optional state not in use) stay empty in every bucket.
    """
    first = lists[keys[0]]
    c = _ext.list_checks()
    if c is not None:
        one = c.one_bucket([lists[k] for k in keys])
    else:
        one = len({t.device for t in first}) == 1 and all(len({t.dtype for t in lists[k]}) == 1 for k in keys)
    if one:  # the common case, without a key per tensor
        return {(first[0].device, *(lists[k][0].dtype for k in keys)): lists}
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(first):
        key = (t.device, *(lists[k][i].dtype for k in keys))
        buckets.setdefault(key, []).append(i)
    if len(buckets) <= 1:
        return {k: lists for k in buckets}
    return {k: {name: [ts[i] for i in idx] if ts else [] for name, ts in lists.items()}
            for k, idx in buckets.items()}


def any_sparse(tensors: list[Tensor]) -> bool:
    """Whether any of `tensors` is sparse (COO), decided in C in the common case of none."""
    c = _ext.list_checks()
    if c is not None and c.all_contiguous([tensors]):
        return False
    return any(t.is_sparse for t in tensors)


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: its elements fill one block of memory in some dimension order."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout_ok(t: Tensor, ref: Tensor) -> bool:
    if t.is_contiguous() and ref.is_contiguous():  # the common case, decided without leaving C
        return True
    return is_dense(t) and (t.numel() <= 1 or t.stride() == ref.stride())


def _nothing() -> None:
    return None


def make_dense(lists: TensorLists, mutated: Sequence[str], key: str = "params"):
    """Return (lists, write_back): lists where every index satisfies the kernels' layout rule, and a
    function that copies results back into the caller's tensors that had to be replaced."""
    ref_list = lists[key]
    c = _ext.list_checks()
    if c is not None:
        contiguous = c.all_contiguous(list(lists.values()))
    else:
        contiguous = all(all(map(Tensor.is_contiguous, ts)) for ts in lists.values())
    if contiguous:  # the common case
        return lists, _nothing
    bad = [i for i, p in enumerate(ref_list)
           if not all(_layout_ok(ts[i], p) for ts in lists.values() if ts)]
    if not bad:
        return lists, _nothing
    out = {name: list(ts) for name, ts in lists.items()}
    pending: list[tuple[Tensor, Tensor]] = []
    for i in bad:
        p = ref_list[i]
        p_dense = is_dense(p)
        for name, ts in lists.items():
            if not ts:
                continue
            t = ts[i]
            if p_dense:  # keep the parameter's layout, copy the others into it
                if name == key or _layout_ok(t, p):
                    continue
                new = torch.empty_like(p, dtype=t.dtype).copy_(t)
            else:  # a strided view: everything at this index goes through contiguous copies
                if t.is_contiguous():
                    continue
                new = t.contiguous()
            out[name][i] = new
            if name in mutated:
                pending.append((t, new))

    def write_back():
        for original, dense in pending:
            original.copy_(dense)

    return out, write_back


def on_device(t: Tensor | None, device: torch.device) -> Tensor | None:
    """A one-element control tensor (scale, flag) on the device of the bucket that reads it."""
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def learning_rate(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """The (lr, lr_tensor) arguments of an optimizer op for a bucket on `device`: a tensor on that
    device is read by the kernel (no host sync; it can change between replays of a CUDA graph), a
    CPU tensor for another device is read here, as torch.optim does (no sync either)."""
    if not isinstance(lr, Tensor):
        return float(lr), None
    if lr.device == device:
        return 0.0, lr
    if lr.device.type == "cpu":
        return lr.item(), None
    return 0.0, lr.to(device, non_blocking=True)


def present_or_empty(tensors: list[Tensor | None], name: str) -> list[Tensor]:
    """An optional per-parameter list of one bucket (master weights, compensation buffers): all
    present, or none (an empty list)."""
    # list.count(None) is C-fast over Nones but calls Tensor.__eq__(None) for every tensor (~2 us
    # each: milliseconds per step for a model's parameters with master weights): count by
    # identity unless the list starts with None (all None, or a mix, which is an error anyway).
    missing = tensors.count(None) if tensors and tensors[0] is None else sum(t is None for t in tensors)
    if missing == len(tensors):
        return []
    if missing:
        raise ValueError(f"`{name}` must hold a tensor for every parameter of a dtype, or for none")
    return tensors


def check_quantized_layouts(op: str, lists: TensorLists, names: Sequence[str], key: str = "params") -> None:
    """int8/uint8 codes (NOTE [compressed optimizer state]) keep their blocks in their own memory
    order, so make_dense must never copy them into another layout: they must already have their
    parameter's (or, beside a parameter that is not dense, be contiguous)."""
    for name in names:
        for i, t in enumerate(lists[name]):
            if t.dtype not in (torch.int8, torch.uint8):
                continue
            p = lists[key][i]
            ok = t.is_contiguous() if not is_dense(p) else _layout_ok(t, p)
            if not ok:
                raise RuntimeError(f"{op}: {name}[{i}] holds int8 block codes laid out unlike its parameter (strides "
                                   f"{t.stride()} vs {p.stride()}); codes cannot be copied into another layout")
