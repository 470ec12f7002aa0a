"""pyeff.optim.Adam and AdamW: torch.optim.Adam/AdamW with one fused kernel per step.

Same constructor (arguments, defaults, validation errors), same state_dict layout ('step' a float32
scalar tensor, 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq' with amsgrad), so checkpoints move both
ways. Keyword-only extras: `max_grad_norm` (fused clipping), `master_weights` and
`kahan_summation` (bf16/fp16 parameters), `state_dtype` and `stochastic_rounding` (compressed
state, NOTE [state formats]), `backend`. AdamW is Adam with decoupled weight decay.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.adam import adam_step
from . import _state
from ._fused import (LOW_PRECISION, FusedOptimizer, append_step_and_low_precision, checkable,
                     init_low_precision_state, low_precision_mode)

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    # torch.optim.Adam's checks and messages, in its order.
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class Adam(FusedOptimizer):
    """Drop-in for :class:`torch.optim.Adam` (see its documentation for the algorithm and arguments).

    Extra keyword-only arguments:
        max_grad_norm (float, optional): clip the global L2 norm of all the optimizer's gradients
            to this value inside the step, as ``clip_grad_norm_`` would (one read-only pass, no
            gradient write). ``optimizer.grad_norm`` then holds the norm before clipping.
        master_weights (bool): keep an fp32 copy of bf16/fp16 parameters (``state['master_param']``)
            and fp32 moments; the parameter becomes the master rounded to nearest even.
        kahan_summation (bool): for bf16/fp16 parameters without master weights, carry each
            update's rounding error in ``state['compensation']`` so small updates are not lost.
        state_dtype (None, torch.float32, torch.bfloat16 or "int8"): how the moments are stored;
            None keeps torch.optim's layout; "int8" stores block-quantized codes
            (``state['exp_avg']`` int8, ``state['exp_avg_sq']`` uint8, each with
            ``state[key + '_absmax']``) for parameters of at least 4096 elements.
        stochastic_rounding (bool): round bf16 moments, int8 codes and bf16 parameters without
            master weights stochastically, from counter-based random bits of `seed` (drawn from
            torch's generator when None).
        backend (str, optional): force an op backend ('cpu', 'reference', ...); see pyeff.ops.
    """

    _LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "master_params",
              "compensations", "exp_avg_absmaxes", "exp_avg_sq_absmaxes", "max_exp_avg_sq_absmaxes", "rng_seeds")
    _MOMENTS = (("exp_avg", True), ("exp_avg_sq", False), ("max_exp_avg_sq", False))
    _PLAN_KEYS = (*FusedOptimizer._PLAN_KEYS, "amsgrad")
    _GROUP_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                       "differentiable": False, "decoupled_weight_decay": False, "fused": None}

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        kahan_summation: bool = False,
        state_dtype: torch.dtype | str | None = None,
        stochastic_rounding: bool = False,
        seed: int | None = None,
        backend: str | None = None,
    ) -> None:
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        for i in (0, 1):
            if isinstance(betas[i], Tensor):
                if not capturable and foreach:
                    raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
                if betas[i].numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        betas = tuple(b.squeeze() if isinstance(b, Tensor) else b for b in betas)  # 0-dim, as torch keeps them

        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            "master_weights": master_weights,
            "kahan_summation": kahan_summation,
            "state_dtype": state_dtype,
            "stochastic_rounding": stochastic_rounding,
            "seed": seed,
        }
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)

    def _validate_group(self, group):
        super()._validate_group(group)
        _check_hyperparameters(checkable(group["lr"]), checkable(group["betas"]), group["eps"], group["weight_decay"])
        _state.check_group(group)

    def _init_param(self, group, p, lists):
        state = self.state[p]
        if not state or (group["amsgrad"] and "max_exp_avg_sq" not in state):
            fmt = _state.moment_format(group, p, low_precision_mode(group, p) == "master")
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                _state.new_moment(state, "exp_avg", True, p, fmt)
                _state.new_moment(state, "exp_avg_sq", False, p, fmt)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                _state.new_moment(state, "max_exp_avg_sq", False, p, fmt)
        mode = init_low_precision_state(group, p, state, _MOMENT_KEYS) if p.dtype in LOW_PRECISION else "plain"
        if group["differentiable"] and state["step"].requires_grad:
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
        lists["params"].append(p)
        lists["grads"].append(p.grad)
        lists["exp_avgs"].append(state["exp_avg"])
        lists["exp_avg_sqs"].append(state["exp_avg_sq"])
        if group["amsgrad"]:
            lists["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
            lists["max_exp_avg_sq_absmaxes"].append(state.get("max_exp_avg_sq_absmax"))
        append_step_and_low_precision(state, p, mode, lists["state_steps"], lists["master_params"],
                                      lists["compensations"])
        lists["exp_avg_absmaxes"].append(state.get("exp_avg_absmax"))
        lists["exp_avg_sq_absmaxes"].append(state.get("exp_avg_sq_absmax"))

    def _fused_update(self, group, lists, grad_mult, found_inf):
        beta1, beta2 = (b.item() if isinstance(b, Tensor) else b for b in group["betas"])
        adam_step(
            lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["max_exp_avg_sqs"],
            lists["state_steps"], lists["master_params"], lists["compensations"],
            exp_avg_absmaxes=lists["exp_avg_absmaxes"], exp_avg_sq_absmaxes=lists["exp_avg_sq_absmaxes"],
            max_exp_avg_sq_absmaxes=lists["max_exp_avg_sq_absmaxes"], rng_seeds=lists["rng_seeds"],
            lr=group["lr"], beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
            maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"], grad_mult=grad_mult,
            found_inf=found_inf, backend=self.backend)

    def _differentiable_update(self, group, lists):
        beta1, beta2 = group["betas"]
        if group["decoupled_weight_decay"]:
            from torch.optim.adamw import adamw as functional
        else:
            from torch.optim.adam import adam as functional
        functional(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                   lists["max_exp_avg_sqs"], lists["state_steps"], foreach=False, capturable=group["capturable"],
                   differentiable=True, fused=False, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                   lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])


class AdamW(Adam):
    """Drop-in for :class:`torch.optim.AdamW`: :class:`Adam` with decoupled weight decay."""

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
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
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, max_grad_norm=max_grad_norm, master_weights=master_weights,
                         kahan_summation=kahan_summation, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding, seed=seed, backend=backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
