r"""cross_entropy: softmax cross-entropy over class indices, the loss and its gradient in one pass.

The contract, for logits x of shape (N, C), int64 targets t of shape (N,), class weights w (1 when
not given, W = \sum_c w_c), label smoothing :math:`\epsilon \in [0, 1]` and rows
:math:`R = \{r : t_r \ne \text{ignore\_index}\}` (math in fp32 for bf16/fp16 logits, fp64 for fp64):

.. math::
    \ell_r &= (1-\epsilon)\, w_{t_r} (\mathrm{lse}_r - x_{r t_r})
             + \tfrac{\epsilon}{C} \textstyle\sum_c w_c (\mathrm{lse}_r - x_{rc}), \qquad r \in R \\
    \ell_r &= 0, \qquad r \notin R \\
    \text{loss} &= \ell \ (\text{none}), \quad \textstyle\sum_r \ell_r \ (\text{sum}), \quad
                  \textstyle\sum_r \ell_r \,/\, \sum_{r\in R} w_{t_r} \ (\text{mean})

which is torch.nn.functional.cross_entropy with these arguments (mean over no rows is nan, as in
torch). With `with_grad`, the op also returns d(loss)/dx for a unit grad_output (for 'none': the
gradient of each row's own loss):

.. math::
    g_{rc} = s_r \big(\mathrm{softmax}(x_r)_c\,((1-\epsilon) w_{t_r} + \epsilon W / C)
             - \tfrac{\epsilon}{C} w_c - (1-\epsilon)\, w_{t_r} [c = t_r]\big)

with s_r = 1 / \sum_{r\in R} w_{t_r} for 'mean', else 1, and s_r = 0 for r not in R (so an ignored
row's gradient is 0, and NaN where its softmax is, as torch's). The loss is in the opmath dtype (the
layers round it to the logits' dtype, or keep fp32 under autocast as torch does); the gradient has
the logits' dtype. The softmax is never stored: a backward only has to scale g by grad_output
(NOTE [gradient in the forward], pyeff/nn/loss.py). A target outside [0, C) that is not
ignore_index raises IndexError("Target t is out of bounds."), as torch does on the CPU; on a GPU,
where that check would sync with the host, the Triton kernels make that row's loss and gradient
NaN instead (kernels/cross_entropy.py).

`cross_entropy_rows` is the per-chunk building block of linear_cross_entropy: unreduced per-row
losses (opmath dtype) and the gradient times a given `grad_scale`, written into given buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._dtypes import opmath_dtype
from ._registry import Op

CROSS_ENTROPY = Op("cross_entropy")

REDUCTIONS = ("none", "mean", "sum")


def check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise as torch does on the CPU for a target that is neither ignore_index nor a class (this reads
    the targets on the host: a sync for GPU tensors)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def total_weight(target: Tensor, weight: Tensor | None, ignore_index: int, acc: torch.dtype) -> Tensor:
    """Sum of w[t] (1 without weights) over the rows that are not ignored, as an `acc` scalar."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(acc)
    # clamped: a target out of range must not index out of bounds on a GPU (it is not checked there)
    return torch.where(valid, weight.to(acc)[torch.where(valid, target, 0).clamp(0, weight.shape[0] - 1)], 0).sum()


def reduce_rows(rows: Tensor, reduction: str, total: Tensor | None) -> Tensor:
    """The loss from per-row losses: as they are, their sum, or their sum over `total` (mean)."""
    if reduction == "none":
        return rows
    return rows.sum() / total if reduction == "mean" else rows.sum()


def reduction_scale(target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
                    acc: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """(total weight, gradient scale) of a reduction, for reduce_rows and the row kernels: for 'mean'
    the total and 1 / total (a 0-d `acc` tensor, left on the device: inf when every row is ignored,
    and then applied to none), else (None, None), a scale of 1."""
    if reduction != "mean":
        return None, None
    total = total_weight(target, weight, ignore_index, acc)
    return total, 1 / total


@CROSS_ENTROPY.reference
def cross_entropy_reference(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                            label_smoothing: float, reduction: str, with_grad: bool) -> tuple[Tensor, Tensor]:
    acc = opmath_dtype(logits.dtype)
    n, c = logits.shape
    check_targets(target, c, ignore_index)
    x = logits.to(acc)
    w = weight.to(acc) if weight is not None else torch.ones(c, dtype=acc, device=x.device)
    eps = label_smoothing
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    logp = torch.log_softmax(x, dim=1)
    w_t = w[t]
    rows = (1 - eps) * w_t * -logp.gather(1, t[:, None]).squeeze(1)
    if eps > 0:
        rows = rows + eps / c * -(logp * w).sum(1)
    rows = torch.where(valid, rows, 0)
    total, scale = reduction_scale(target, weight, ignore_index, reduction, acc)
    loss = reduce_rows(rows, reduction, total)
    if not with_grad:
        return loss, logits.new_empty((0,))
    g = logp.exp() * ((1 - eps) * w_t + eps * w.sum() / c)[:, None] - eps / c * w
    g = g - torch.nn.functional.one_hot(t, c).to(acc) * ((1 - eps) * w_t)[:, None]
    g = g * torch.where(valid, 1 if scale is None else scale, 0)[:, None]
    return loss, g.to(logits.dtype)


def _rows_then_reduce(rows_kernel, logits, target, weight, ignore_index, label_smoothing, reduction, with_grad):
    """The backends: per-row losses and the scaled gradient from `rows_kernel` (the signature of
    kernels/cross_entropy.cross_entropy_rows), then the reduction."""
    total, scale = reduction_scale(target, weight, ignore_index, reduction, opmath_dtype(logits.dtype))
    rows = logits.new_empty((logits.shape[0],), dtype=opmath_dtype(logits.dtype))
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if with_grad else None
    rows_kernel(logits, target, weight, ignore_index, label_smoothing, scale, rows, grad)
    return reduce_rows(rows, reduction, total), grad if grad is not None else logits.new_empty((0,))


def _cpu_rows(logits, target, weight, ignore_index, label_smoothing, grad_scale, rows, grad):
    torch.ops.pyeff.cross_entropy_rows_cpu(logits, target, weight, ignore_index, label_smoothing,
                                           1.0 if grad_scale is None else float(grad_scale), rows, grad)


@CROSS_ENTROPY.impl("cpu")
def cross_entropy_cpu(logits, target, weight, ignore_index, label_smoothing, reduction, with_grad):
    check_targets(target, logits.shape[1], ignore_index)  # before the total weight indexes with them
    return _rows_then_reduce(_cpu_rows, logits, target, weight, ignore_index, label_smoothing, reduction, with_grad)


@CROSS_ENTROPY.impl("triton")
def cross_entropy_triton(logits, target, weight, ignore_index, label_smoothing, reduction, with_grad):
    from pyeff.kernels.cross_entropy import cross_entropy_rows

    if logits.device.type == "cpu":  # the interpreter; on a GPU the kernel marks a bad row NaN (no sync)
        check_targets(target, logits.shape[1], ignore_index)
    return _rows_then_reduce(cross_entropy_rows, logits, target, weight, ignore_index, label_smoothing, reduction,
                             with_grad)


@CROSS_ENTROPY.fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction, with_grad):
    loss = logits.new_empty((logits.shape[0],) if reduction == "none" else (), dtype=opmath_dtype(logits.dtype))
    grad = logits.new_empty(logits.shape) if with_grad else logits.new_empty((0,))
    return loss, grad


def check_inputs(op: str, logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float,
                 reduction: str) -> None:
    """The contract's shapes and dtypes, checked before any backend runs."""
    if logits.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise RuntimeError(f"pyeff.ops.{op}: expected float32, float64, bfloat16 or float16 logits, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"Invalid logits shape for pyeff.ops.{op}: {tuple(logits.shape)}; expected (rows, classes) "
                         "with at least one class")
    if target.dtype != torch.int64:
        raise RuntimeError(f"pyeff.ops.{op}: expected int64 target, got {target.dtype}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"Invalid target shape for pyeff.ops.{op}: {tuple(target.shape)}; expected "
                         f"({logits.shape[0]},)")
    if target.device != logits.device:
        raise RuntimeError(f"pyeff.ops.{op}: `target` is on {target.device} but `logits` on {logits.device}; "
                           "move them to one device")
    if weight is not None:
        if weight.shape != logits.shape[1:]:
            raise ValueError(f"Invalid weight shape for pyeff.ops.{op}: {tuple(weight.shape)}; expected "
                             f"({logits.shape[1]},)")
        if weight.dtype != logits.dtype or weight.device != logits.device:
            raise RuntimeError(f"pyeff.ops.{op}: `weight` is {weight.dtype} on {weight.device} but `logits` "
                               f"{logits.dtype} on {logits.device}; pass weight with the logits' dtype and device")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"Invalid label_smoothing: {label_smoothing}; expected a value in [0, 1]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"Invalid reduction: {reduction!r}; expected one of {', '.join(REDUCTIONS)}")


def cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", *, with_grad: bool = True,
                  backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d logits for a unit grad_output) for logits (N, C) and int64 target (N,);
    the gradient is an empty tensor without `with_grad`. See the module docstring."""
    check_inputs("cross_entropy", logits, target, weight, label_smoothing, reduction)
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    with torch.no_grad():  # the op returns its gradient; its outputs join no graph
        return CROSS_ENTROPY(CROSS_ENTROPY.choose(logits.device, backend), logits, target, weight, int(ignore_index),
                             float(label_smoothing), reduction, bool(with_grad))
