"""pyeff.optim.SGD: torch.optim.SGD with one fused kernel per step.

Same constructor (arguments, defaults, validation errors, in torch's order), same state: a
'momentum_buffer' per parameter, created at its first step as a copy of its gradient, and none at
all without momentum, as torch keeps it; so checkpoints move both ways. Keyword-only extras, as
for pyeff.optim.Adam: `max_grad_norm` (fused clipping), `master_weights` (fp32 master and fp32
momentum buffer for bf16/fp16 parameters), `kahan_summation` (compensated parameter updates for
bf16/fp16 parameters without a master copy), `backend`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.sgd import sgd_step
from ._fused import LOW_PRECISION, FusedOptimizer, checkable, init_low_precision_state, low_precision_mode


def _check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov) -> None:
    # torch.optim.SGD's checks and messages, in its order.
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class SGD(FusedOptimizer):
    """Drop-in for :class:`torch.optim.SGD` (see its documentation for the algorithm and arguments).

    Sparse gradients are not supported by the fused step (nor by torch's ``fused=True``): it raises
    before anything is written (``differentiable=True`` runs torch's own step, which takes them).

    Extra keyword-only arguments:
        max_grad_norm (float, optional): clip the global L2 norm of all the optimizer's gradients
            to this value inside the step, as ``clip_grad_norm_`` would (one read-only pass, no
            gradient write). ``optimizer.grad_norm`` then holds the norm before clipping.
        master_weights (bool): keep an fp32 copy of bf16/fp16 parameters (``state['master_param']``)
            and an fp32 ``state['momentum_buffer']``; the parameter becomes the master rounded to
            nearest even.
        kahan_summation (bool): for bf16/fp16 parameters without master weights, carry each
            update's rounding error in ``state['compensation']`` so small updates are not lost.
        backend (str, optional): force an op backend ('cpu', 'reference', ...); see pyeff.ops.
    """

    _supports_sparse_grads = True  # checked per group in _check_params: torch's own step takes them
    _LISTS = ("params", "grads", "momentum_buffers", "is_first_step", "master_params", "compensations")
    _MOMENTS = (("momentum_buffer", True),)  # checkpoints: kept in fp32 beside master weights
    _PLAN_KEYS = (*FusedOptimizer._PLAN_KEYS, "momentum")
    _GROUP_DEFAULTS = {"nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": False}

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        kahan_summation: bool = False,
        backend: str | None = None,
    ) -> None:
        _check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "master_weights": master_weights,
            "kahan_summation": kahan_summation,
        }
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)

    def _validate_group(self, group):
        super()._validate_group(group)
        _check_hyperparameters(checkable(group["lr"]), group["momentum"], group["dampening"], group["weight_decay"],
                               group["nesterov"])

    def _check_params(self, group):
        super()._check_params(group)
        if group["differentiable"]:
            return
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("SGD: sparse gradients are not supported by the fused step (nor by "
                                   "torch.optim.SGD's `fused=True`); use torch.optim.SGD for them")

    def _init_param(self, group, p, lists):
        mode = low_precision_mode(group, p) if p.dtype in LOW_PRECISION else "plain"
        # torch.optim.SGD creates no state entry until it has a momentum buffer to keep.
        state = self.state[p] if mode != "plain" else self.state.get(p, {})
        if mode != "plain":
            init_low_precision_state(group, p, state, ("momentum_buffer",))
        lists["params"].append(p)
        lists["grads"].append(p.grad)
        if group["momentum"] != 0:
            buf = state.get("momentum_buffer")  # None in checkpoints of torch < 2.2 without momentum
            lists["is_first_step"].append(buf is None)
            if buf is None:  # written by the step; kept in state by _update unless the step is skipped
                buf = torch.empty_like(p, dtype=torch.float32 if mode == "master" else p.dtype,
                                       memory_format=torch.preserve_format)
            lists["momentum_buffers"].append(buf)
        lists["master_params"].append(state["master_param"] if mode == "master" else None)
        lists["compensations"].append(state["compensation"] if mode == "kahan" else None)

    def _fused_update(self, group, lists, grad_mult, found_inf):
        sgd_step(
            lists["params"], lists["grads"], lists["momentum_buffers"], lists["is_first_step"], lists["master_params"],
            lists["compensations"], lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
            weight_decay=float(group["weight_decay"]), nesterov=group["nesterov"], maximize=group["maximize"],
            grad_mult=grad_mult, found_inf=found_inf, backend=self.backend)

    def _update(self, group, lists, has_complex, grad_mult, found_inf):
        super()._update(group, lists, has_complex, grad_mult, found_inf)
        if group["differentiable"]:  # torch's own step kept its buffers (_differentiable_update)
            return
        first = lists["is_first_step"]
        new = [(p, b) for p, b, f in zip(lists["params"], lists["momentum_buffers"], first) if f] if any(first) else []
        # A skipped first step creates no buffer, as torch's skipped step does not: decided by reading
        # found_inf, a sync on CUDA, but only at a step that creates buffers.
        if new and (found_inf is None or not found_inf.item()):
            for p, buf in new:
                self.state[p]["momentum_buffer"] = buf

    def _differentiable_update(self, group, lists):
        from torch.optim.sgd import sgd as functional

        bufs = [None if first else b for b, first in zip(lists["momentum_buffers"], lists["is_first_step"])]
        functional(lists["params"], lists["grads"], bufs, has_sparse_grad=any(g.is_sparse for g in lists["grads"]),
                   foreach=False, fused=False, weight_decay=group["weight_decay"], momentum=group["momentum"],
                   lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                   maximize=group["maximize"])
        if group["momentum"] != 0:
            for p, buf in zip(lists["params"], bufs):
                self.state[p]["momentum_buffer"] = buf
