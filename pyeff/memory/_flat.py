"""Flat parameter buffers: the parameters of one (device, dtype) as consecutive views of one buffer.

    flat = pyeff.memory.flatten_parameters(model)      # after model.to(device, dtype), before DDP
    opt = pyeff.optim.AdamW(model.parameters())       # unchanged

Each parameter keeps its identity (module attributes, optimizer references, hooks), shape, strides
and values; its `.data` becomes a view of the buffer, in the order the parameters come, with no
gap, so a kernel can walk all of them as one array (flat_view). Gradients get a buffer with the
same layout. The model's state_dict holds the same keys, shapes and values (views: saving one
parameter alone with torch.save writes the whole buffer, as for any view). Moving or casting the
model afterwards (`model.to`, `.half()`) replaces the parameters' data and undoes the flattening:
flatten after.

NOTE [flat gradients]
Autograd accumulates into `p.grad` in place when it exists; when it is None, it installs a tensor
of its own. torch's `zero_grad()` sets gradients to None by default, so after it the next backward
would give every parameter a gradient outside the buffer. Each flattened parameter therefore has a
post-accumulate-grad hook that, when `p.grad` is not its view of the gradient buffer, copies the
gradient there and puts the view back: when the optimizer runs, gradients are views of the buffer
whichever `zero_grad` was used. With `zero_grad(set_to_none=False)` (or FlatParameters.zero_grad(),
one fill per buffer) the views stay in place and backward adds into them directly, without the
copy. A parameter that gets no gradient keeps `p.grad = None`, so optimizers skip it as before
(its slice of the buffer then holds a stale value: flat_view(grads) sees that). Gradients that
require grad themselves (backward with create_graph=True) are left where autograd put them.
Under DistributedDataParallel the reducer copies the averaged gradients back into `p.grad` in
place, i.e. into the buffer (the default gradient_as_bucket_view=False; with True, DDP makes the
gradients views of its own buckets instead).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..ops._multi_tensor import is_dense

# parameter -> handle of its post-accumulate-grad hook, so that flattening again replaces it
_HOOKS = WeakIdKeyDictionary()


@dataclass
class FlatBuffer:
    """The parameters of one (device, dtype, requires_grad): `params[offsets[i]:offsets[i] +
    members[i].numel()]` holds members[i]; `grads` (None without gradients) has the same layout."""

    params: Tensor
    grads: Tensor | None
    members: list[Tensor]
    offsets: list[int]

    def grad_view(self, i: int) -> Tensor:
        return _view_like(self.grads, self.offsets[i], self.members[i])


@dataclass
class FlatParameters:
    """What flatten_parameters() did: one FlatBuffer per (device, dtype, requires_grad)."""

    buffers: list[FlatBuffer]
    skipped: list[Tensor] = field(default_factory=list)  # parameters that could not be flattened

    def zero_grad(self) -> None:
        """Zero every gradient buffer in one fill each and make every gradient its view again (the
        in-place alternative to `optimizer.zero_grad()`, see NOTE [flat gradients])."""
        with torch.no_grad():
            for buf in self.buffers:
                if buf.grads is None:
                    continue
                buf.grads.zero_()
                for i, p in enumerate(buf.members):
                    if not _is_view(p.grad, buf.grads, buf.offsets[i]):
                        p.grad = buf.grad_view(i)

    def remove_hooks(self) -> None:
        """Stop re-attaching gradient views (the parameters stay views of the buffers)."""
        for buf in self.buffers:
            for p in buf.members:
                handle = _HOOKS.pop(p, None)
                if handle is not None:
                    handle.remove()


def _view_like(buffer: Tensor, offset: int, like: Tensor) -> Tensor:
    return buffer.as_strided(like.shape, like.stride(), buffer.storage_offset() + offset)


def _is_view(t: Tensor | None, buffer: Tensor, offset: int) -> bool:
    return (t is not None and t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
            and t.storage_offset() == buffer.storage_offset() + offset)


def _collect(model_or_params) -> list[Tensor]:
    if isinstance(model_or_params, torch.nn.Module):
        items: Iterable = model_or_params.parameters()
    elif isinstance(model_or_params, Tensor):
        items = [model_or_params]
    else:
        items = []
        for x in model_or_params:
            items.extend(x["params"] if isinstance(x, dict) else [x])  # parameter groups too
    seen, params = set(), []
    for p in items:
        if not isinstance(p, Tensor):
            raise ValueError(f"Invalid parameter: expected a Tensor, got {type(p).__name__}")
        if not p.is_leaf:
            raise ValueError("Invalid parameter: a non-leaf tensor (the result of an operation); flatten the "
                             "leaf parameters")
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _make_hook(view: Tensor):
    def hook(p: Tensor) -> None:
        g = p.grad
        if g is None or g.requires_grad or (g.data_ptr() == view.data_ptr() and g.stride() == view.stride()):
            return
        with torch.no_grad():
            view.copy_(g)
        p.grad = view

    return hook


def flatten_parameters(model_or_params, grads: bool = True) -> FlatParameters:
    """Move parameters (and, with `grads`, their gradients) into one contiguous buffer per
    (device, dtype, requires_grad), each parameter becoming a view of it (module docstring).

    `model_or_params` is an nn.Module, an iterable of parameters, or parameter groups (dicts with
    "params"). Shared parameters are flattened once. Sparse parameters and parameters that
    overlap themselves (expanded) stay as they are (listed in the result's `skipped`).
    """
    params = _collect(model_or_params)
    groups: dict[tuple, list[Tensor]] = {}
    skipped = []
    for p in params:
        if p.layout != torch.strided or not is_dense(p):
            skipped.append(p)
            continue
        groups.setdefault((p.device, p.dtype, p.requires_grad), []).append(p)

    buffers = []
    with torch.no_grad():
        for (device, dtype, requires_grad), members in groups.items():
            offsets, total = [], 0
            for p in members:
                offsets.append(total)
                total += p.numel()
            flat = torch.empty(total, dtype=dtype, device=device)
            grad_flat = torch.zeros(total, dtype=dtype, device=device) if grads and requires_grad else None
            buf = FlatBuffer(flat, grad_flat, members, offsets)
            for i, p in enumerate(members):
                view = _view_like(flat, offsets[i], p)
                view.copy_(p)
                p.data = view
                if grad_flat is None:
                    continue
                gview = buf.grad_view(i)
                if p.grad is not None:
                    gview.copy_(p.grad)
                    p.grad = gview
                old = _HOOKS.pop(p, None)
                if old is not None:
                    old.remove()
                _HOOKS[p] = p.register_post_accumulate_grad_hook(_make_hook(gview))
            buffers.append(buf)
    return FlatParameters(buffers, skipped)


def flat_view(tensors: list[Tensor]) -> Tensor | None:
    """The 1-D tensor spanning `tensors` when they are dense views that follow one another without
    gaps in one storage, in list order (as flatten_parameters lays out parameters and gradients);
    None otherwise. An element-wise kernel can then run once over that span in place of the list
    (for several lists at once when each gives a span and their tensors have equal strides)."""
    if not tensors or tensors[0] is None:
        return None
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    expected = first.storage_offset()
    for t in tensors:
        if (t is None or t.dtype != first.dtype or t.device != first.device or t.layout != torch.strided
                or t.untyped_storage().data_ptr() != storage or t.storage_offset() != expected or not is_dense(t)):
            return None
        expected += t.numel()
    return first.detach().as_strided((expected - first.storage_offset(),), (1,), first.storage_offset())


def flat_zeros_like(tensors: list[Tensor], dtype: torch.dtype | None = None) -> tuple[Tensor, list[Tensor]]:
    """One zero-filled 1-D buffer and, for each of `tensors` (dense, on one device), a view of it with
    that tensor's shape and strides, consecutive in list order: state laid out like flattened
    parameters (an optimizer's moments, say), so that flat_view() of the views is the buffer."""
    if not tensors:
        raise ValueError("Invalid tensors: an empty list")
    for t in tensors:
        if t.layout != torch.strided or not is_dense(t) or t.device != tensors[0].device:
            raise ValueError("Invalid tensors: each must be dense and on the device of the first")
    buffer = torch.zeros(sum(t.numel() for t in tensors), dtype=dtype or tensors[0].dtype, device=tensors[0].device)
    views, offset = [], 0
    for t in tensors:
        views.append(_view_like(buffer, offset, t))
        offset += t.numel()
    return buffer, views
