"""pyeff.optim.Adagrad: torch.optim.Adagrad with one fused kernel per step, sparse gradients included.

Same constructor (arguments, defaults, validation errors, in torch's order), same state, created
eagerly in the constructor as torch does ('step' a scalar tensor, 'sum' filled with
`initial_accumulator_value`), so checkpoints move both ways. Sparse gradients (e.g.
``nn.Embedding(sparse=True)``) are coalesced and only their rows are updated, by the same kernel
as the dense ones. Keyword-only extras, as for pyeff.optim.Adam: `max_grad_norm` (fused clipping),
`master_weights` (fp32 master and fp32 'sum' for bf16/fp16 parameters), `kahan_summation`
(compensated parameter updates for bf16/fp16 parameters without a master copy), `state_dtype` and
`stochastic_rounding` (compressed state, NOTE [state formats]), `backend`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.adagrad import SPARSE_WEIGHT_DECAY, adagrad_step, check_sparse_indices
from . import _state
from ._fused import (LOW_PRECISION, FusedOptimizer, append_step_and_low_precision, checkable,
                     init_low_precision_state, low_precision_mode)


def _check_hyperparameters(lr, lr_decay, weight_decay, initial_accumulator_value, eps) -> None:
    # torch.optim.Adagrad's checks and messages, in its order.
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= lr_decay:
        raise ValueError(f"Invalid lr_decay value: {lr_decay}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= initial_accumulator_value:
        raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")


def _step_dtype(fused) -> torch.dtype:
    # torch.optim.Adagrad's 'step': float32 when fused, else float64 under a float64 default dtype.
    if fused or torch.get_default_dtype() != torch.float64:
        return torch.float32
    return torch.float64


class Adagrad(FusedOptimizer):
    """Drop-in for :class:`torch.optim.Adagrad` (see its documentation for the algorithm and arguments).

    Sparse gradients are supported as torch supports them (coalesced; only the touched rows of the
    parameter and of 'sum' change; `weight_decay` must be 0), also with the extras below.

    Extra keyword-only arguments:
        max_grad_norm (float, optional): clip the global L2 norm of all the optimizer's gradients
            to this value inside the step, as ``clip_grad_norm_`` would (one read-only pass, no
            gradient write). ``optimizer.grad_norm`` then holds the norm before clipping.
        master_weights (bool): keep an fp32 copy of bf16/fp16 parameters (``state['master_param']``)
            and an fp32 ``state['sum']``; the parameter becomes the master rounded to nearest even.
        kahan_summation (bool): for bf16/fp16 parameters without master weights, carry each
            update's rounding error in ``state['compensation']``, so that the small late updates of
            Adagrad (its step size shrinks as 'sum' grows) are not rounded away. 'sum' stays in the
            parameter's dtype, as torch keeps it.
        state_dtype (None, torch.float32, torch.bfloat16 or "int8"): how 'sum' is stored; None keeps
            torch.optim's layout; "int8" stores block-quantized uint8 codes with
            ``state['sum_absmax']`` for parameters of at least 4096 elements (dense gradients only).
        stochastic_rounding (bool): round a bf16 'sum', int8 codes and bf16 parameters without
            master weights stochastically, from counter-based random bits of `seed` (drawn from
            torch's generator when None). A bf16 'sum' rounded to nearest stops growing once an
            update falls below half its last place; stochastic rounding keeps its expectation.
        backend (str, optional): force an op backend ('cpu', 'reference', ...); see pyeff.ops.
    """

    _supports_sparse_grads = True
    _LISTS = ("params", "grads", "state_sums", "state_steps", "master_params", "compensations", "state_sum_absmaxes",
              "rng_seeds")
    _MOMENTS = (("sum", False),)
    _GROUP_DEFAULTS = {"foreach": None, "maximize": False, "differentiable": False, "fused": None}

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        kahan_summation: bool = False,
        state_dtype: torch.dtype | str | None = None,
        stochastic_rounding: bool = False,
        seed: int | None = None,
        backend: str | None = None,
    ) -> None:
        _check_hyperparameters(lr, lr_decay, weight_decay, initial_accumulator_value, eps)
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
            "master_weights": master_weights,
            "kahan_summation": kahan_summation,
            "state_dtype": state_dtype,
            "stochastic_rounding": stochastic_rounding,
            "seed": seed,
        }
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)
        # Like torch.optim.Adagrad, state exists from the start (with the constructor's
        # initial_accumulator_value; parameters added later get the defaults' one).
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(group, p, initial_accumulator_value)

    def share_memory(self) -> None:
        """Calls tensor.share_memory_() on the state sum tensors."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _init_state(self, group: dict, p: Tensor, initial_accumulator_value: float) -> None:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=_step_dtype(group["fused"]), device=p.device)
        fmt = _state.moment_format(group, p, low_precision_mode(group, p) == "master")
        _state.new_moment(state, "sum", False, p, fmt, fill=initial_accumulator_value)
        if p.dtype in LOW_PRECISION:
            init_low_precision_state(group, p, state, ("sum",))

    def _validate_group(self, group):
        super()._validate_group(group)
        _check_hyperparameters(checkable(group["lr"]), group["lr_decay"], group["weight_decay"],
                               group.get("initial_accumulator_value", 0), group["eps"])
        _state.check_group(group)

    def _check_params(self, group):
        super()._check_params(group)
        for p in group["params"]:
            if p.grad is None or not p.grad.is_sparse:
                continue
            if group["weight_decay"] != 0:
                raise RuntimeError(SPARSE_WEIGHT_DECAY)
            if self.state[p].get("sum") is not None and self.state[p]["sum"].dtype == torch.uint8:
                raise RuntimeError("Adagrad: int8 block codes of 'sum' (`state_dtype='int8'`) take dense gradients "
                                   "only; use state_dtype=torch.bfloat16 (with stochastic_rounding) for sparse ones")
            if torch.is_complex(p) and not group["differentiable"]:
                raise RuntimeError("Adagrad: sparse gradients of complex parameters are not supported by the "
                                   "fused step; use torch.optim.Adagrad for them")
            check_sparse_indices(p.grad, "Adagrad")

    def _init_param(self, group, p, lists):
        state = self.state[p]
        if not state:
            self._init_state(group, p, self.defaults["initial_accumulator_value"])
        mode = init_low_precision_state(group, p, state, ("sum",)) if p.dtype in LOW_PRECISION else "plain"
        lists["params"].append(p)
        # A sparse gradient is coalesced once here: the overflow/norm pass and the update share it.
        lists["grads"].append(p.grad.coalesce() if p.grad.is_sparse else p.grad)
        lists["state_sums"].append(state["sum"])
        append_step_and_low_precision(state, p, mode, lists["state_steps"], lists["master_params"],
                                      lists["compensations"])
        lists["state_sum_absmaxes"].append(state.get("sum_absmax"))

    def _fused_update(self, group, lists, grad_mult, found_inf):
        adagrad_step(
            lists["params"], lists["grads"], lists["state_sums"], lists["state_steps"], lists["master_params"],
            lists["compensations"], state_sum_absmaxes=lists["state_sum_absmaxes"], rng_seeds=lists["rng_seeds"],
            lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=group["maximize"], grad_mult=grad_mult, found_inf=found_inf,
            backend=self.backend)

    def _differentiable_update(self, group, lists):
        from torch.optim.adagrad import adagrad as functional

        functional(lists["params"], lists["grads"], lists["state_sums"], lists["state_steps"], fused=False,
                   has_sparse_grad=any(g.is_sparse for g in lists["grads"]), foreach=False, differentiable=True,
                   has_complex=any(torch.is_complex(p) for p in lists["params"]), lr=group["lr"], weight_decay=group["weight_decay"],
                   lr_decay=group["lr_decay"], eps=group["eps"], maximize=group["maximize"])
