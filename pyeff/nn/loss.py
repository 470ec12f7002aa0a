"""Losses whose backward is one multiplication: CrossEntropyLoss, cross_entropy, linear_cross_entropy.

NOTE [gradient in the forward]
torch's cross-entropy saves the log-softmax (N x C) for its backward, which then builds the logits'
gradient, another N x C tensor. The gradient of a loss for a unit grad_output is known during the
forward, so these forwards compute it there, in the same pass over the logits as the loss, and save
only it; the backward multiplies it by grad_output (a scalar for 'mean' and 'sum', one value per row
for 'none'). The softmax is never stored. What lives from forward to backward is that one gradient
(the logits are free to go as soon as the forward returns, unless something else holds them).
linear_cross_entropy goes further: it saves grad_hidden, grad_weight and grad_bias, accumulated
chunk by chunk during the forward, and never holds the full logits (pyeff/ops/linear_cross_entropy.py).
The backward is not itself differentiable (double backward raises), and forwards outside grad mode
skip the gradient entirely.
A grad_output of 1 (loss.backward()) costs nothing: the saved gradient is returned as it is. On the
CPU that is read from the (CPU) grad_output; on a GPU reading it would sync, so the saved gradients
are scaled in place by a kernel that reads grad_output on the device and touches no memory when it
equals the factor they already hold (pyeff.kernels.cross_entropy.rescale_). A second backward through
a retained graph rescales them by the ratio of the grad_outputs; after a grad_output of 0 that ratio
is undefined and the gradient becomes NaN (never silently wrong).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import ops
from ..ops._registry import triton_available
from ..ops.cross_entropy import REDUCTIONS

_INT_TARGETS = (torch.int64, torch.uint8)  # what torch accepts as class indices


def _check_common(fn: str, target: Tensor, reduction: str, label_smoothing: float) -> None:
    if target.is_floating_point() or target.is_complex():
        raise RuntimeError(f"pyeff {fn}: class-probability targets (a floating-point `target`) are not supported; "
                           "pass class indices (int64), or use torch.nn.functional.cross_entropy")
    if target.dtype not in _INT_TARGETS:
        raise RuntimeError(f"pyeff {fn}: expected target dtype to be Long or Byte (int64 or uint8), "
                           f"but got {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def _is_one(grad_output: Tensor) -> bool:
    """A CPU scalar grad_output of exactly 1 (what loss.backward() passes), checked without a device
    sync; never under torch.compile, which traces the multiplication."""
    return (grad_output.numel() == 1 and grad_output.device.type == "cpu" and not torch.compiler.is_compiling()
            and grad_output.item() == 1.0)


def _round_like_torch(loss: Tensor, input: Tensor) -> Tensor:
    """The ops give the loss in fp32 (fp64); torch gives it in the input's dtype, except under autocast,
    where its cross-entropy runs in fp32."""
    return loss if torch.is_autocast_enabled(input.device.type) else loss.to(input.dtype)


def _applied_factor(*grads: Tensor) -> Tensor | None:
    """The device scalar that tracks the factor saved GPU gradients hold (1 after the forward), for
    an in-place rescale in the backward; None where the backward multiplies instead."""
    live = [g for g in grads if g.numel()]
    if not live or live[0].device.type != "cuda" or not triton_available() or torch.compiler.is_compiling():
        return None
    return torch.ones((), dtype=torch.float32, device=live[0].device)


def _scale(grads: list[Tensor], grad_output: Tensor, reduction: str, applied: Tensor | None) -> list[Tensor]:
    # NOTE [gradient in the forward]: a unit grad_output takes the saved gradients as they are.
    # Autograd never accumulates into them in place (the saved reference makes it copy), so a
    # retained graph finds them again. Skipping a fresh buffer matters on the CPU too, where a new
    # large tensor pays its page faults (~0.1 s per 256 MiB here).
    if applied is not None and grad_output.numel() == 1 and not torch.compiler.is_compiling():
        from pyeff.kernels.cross_entropy import rescale_

        rescale_(grads, grad_output, applied)
        return grads
    if _is_one(grad_output):
        return grads
    return [g * (grad_output.unsqueeze(-1) if reduction == "none" and g.dim() == 2 else grad_output) for g in grads]


class _CrossEntropy(torch.autograd.Function):
    """Forward: loss and logits' gradient in one op; backward: that gradient times grad_output."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, reduction, backend, grad_mode):
        loss, grad = ops.cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction,
                                       with_grad=grad_mode and ctx.needs_input_grad[0], backend=backend)
        ctx.reduction = reduction
        ctx.applied = _applied_factor(grad)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = _scale(list(ctx.saved_tensors), grad_output, ctx.reduction, ctx.applied)
        return grad, None, None, None, None, None, None, None


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  backend: str | None = None) -> Tensor:
    """torch.nn.functional.cross_entropy for class-index targets, with the gradient computed in the
    forward (NOTE [gradient in the forward]). `input` is (C,), (N, C) or (N, C, d1, ...) with the
    classes in dimension 1; `target` holds class indices (int64 or uint8) of the matching shape.
    Class-probability targets are refused with an error."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    _check_common("cross_entropy", target, reduction, label_smoothing)
    if not input.is_floating_point():
        raise RuntimeError(f"pyeff cross_entropy: expected a floating-point input, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("Invalid input shape for pyeff cross_entropy: (); expected (C,), (N, C) or (N, C, d1, ...)")
    if input.dim() == 1:
        if target.dim() != 0:
            raise ValueError(f"Expected target of shape () for an input of shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        logits, rows_target = input.unsqueeze(0), target.reshape(1)
    elif input.dim() == 2:
        if target.shape != input.shape[:1]:
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                             f"({target.shape[0] if target.dim() else 0}).")
        logits, rows_target = input, target
    else:
        expected = (input.shape[0], *input.shape[2:])
        if tuple(target.shape) != expected:
            raise RuntimeError(f"Expected target size {list(expected)}, got {list(target.shape)}")
        logits, rows_target = input.movedim(1, -1).reshape(-1, input.shape[1]), target.reshape(-1)
    num_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if weight is not None:
        if weight.shape != (num_classes,):
            raise RuntimeError(f"weight tensor should be defined either for all {num_classes} classes or no classes "
                               f"but got weight tensor of shape: {list(weight.shape)}")
        if weight.dtype != input.dtype:
            raise RuntimeError(f"pyeff cross_entropy: expected weight of dtype {input.dtype} like input, "
                               f"got {weight.dtype}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("pyeff cross_entropy: `weight` requires grad, but the loss is not differentiable "
                               "with respect to the class weights (as in torch); pass weight.detach()")
    loss = _CrossEntropy.apply(logits, rows_target.long(), weight, ignore_index, max(0.0, float(label_smoothing)),
                               reduction, backend, torch.is_grad_enabled())
    loss = _round_like_torch(loss, input)
    return loss.reshape(target.shape) if reduction == "none" else loss


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss (same constructor, attributes and state_dict) with the gradient
    computed in the forward (NOTE [gradient in the forward]); class-index targets only."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: loss and every parameter's gradient, chunk by chunk; backward: those times grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size, backend,
                grad_mode):
        need = ctx.needs_input_grad if grad_mode else (False,) * 4
        loss, gh, gw, gb = ops.linear_cross_entropy(
            hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size,
            grad_hidden=need[0], grad_weight=need[1], grad_bias=bias is not None and need[3], backend=backend)
        ctx.need = (need[0], need[1], bias is not None and need[3])
        ctx.applied = _applied_factor(gh, gw, gb)
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        wanted = [g for g, needed in zip(ctx.saved_tensors, ctx.need) if needed]
        scaled = iter(_scale(wanted, grad_output, "sum", ctx.applied))
        grads = [next(scaled) if needed else None for needed in ctx.need]
        return grads[0], grads[1], None, grads[2], None, None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                         chunk_size: int | None = None, *, backend: str | None = None) -> Tensor:
    """cross_entropy(linear(hidden, weight, bias), target) without materialising the logits:
    `hidden` is (..., H), `weight` (V, H), `bias` (V,), `target` (...) of class indices. The logits
    go in chunks holding as many as `chunk_size` rows (default: the backend's choice; see
    pyeff/ops/linear_cross_entropy.py); the forward computes the gradients of hidden, weight and bias
    (grad_weight accumulated in fp32) and the backward scales them (NOTE [gradient in the forward]).
    reduction='none' only without gradients."""
    _check_common("linear_cross_entropy", target, reduction, label_smoothing)
    if hidden.dim() == 0 or tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"Expected target of shape {list(hidden.shape[:-1])} for hidden of shape "
                         f"{list(hidden.shape)}, got {list(target.shape)}")
    if torch.is_autocast_enabled(hidden.device.type):  # what autocast does to the inputs of F.linear
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight, bias = (t.to(dtype) if t is not None and t.dtype != torch.float64 else t
                                for t in (hidden, weight, bias))
    rows_hidden = hidden.reshape(-1, hidden.shape[-1])
    loss = _LinearCrossEntropy.apply(rows_hidden, weight, target.reshape(-1).long(), bias, ignore_index,
                                     max(0.0, float(label_smoothing)), reduction, chunk_size, backend,
                                     torch.is_grad_enabled())
    loss = _round_like_torch(loss, hidden)
    return loss.reshape(target.shape) if reduction == "none" else loss
