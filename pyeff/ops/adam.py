r"""adam_step: one fused Adam/AdamW step over lists of tensors.

The contract, per parameter i (math in fp32 for bf16/fp16 tensors, fp64 for fp64):

.. math::
    g &= \mathrm{grad}_i \cdot \mathrm{grad\_mult} \quad (\text{negated if maximize}) \\
    p &\leftarrow p\,(1 - \gamma\lambda) \ \text{(decoupled)} \quad\text{or}\quad g \leftarrow g + \lambda p \\
    m &\leftarrow m + (1-\beta_1)(g - m), \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
    \hat v &= \max(v^{max}, v) \ \text{(amsgrad)} \ \text{else}\ v \\
    p &\leftarrow p - \frac{\gamma}{1-\beta_1^t}\, \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

with t the parameter's step count after the increment, in the operation order of
torch.optim.Adam's single-tensor implementation; :math:`\gamma` is `lr`, or the value of the
one-element `lr_tensor` when given (read by the kernel on the device, never on the host). A non-zero
`found_inf` skips the step entirely (NOTE [overflow skip] in csrc/checks.h). `master_params` /
`compensations` select the low-precision modes of NOTE [low-precision parameter modes]
(csrc/cpu/low_precision.h).

Compressed state (NOTE [compressed optimizer state] in csrc/state_codec.h): the moments may be
stored as float32, bfloat16, or int8 blocks: `exp_avgs` int8 codes, `exp_avg_sqs` (and
`max_exp_avg_sqs`) uint8 codes, laid out like their parameter, each with its blocks' fp32 absmax
in `exp_avg_absmaxes` / `exp_avg_sq_absmaxes` / `max_exp_avg_sq_absmaxes` (empty lists when the
moments are not codes). They are dequantized, updated and stored again in the same pass. With
`rng_seeds` (one seed per tensor; empty: round to nearest even) every bfloat16 moment, every
code and a bfloat16 parameter without master weights or compensation is rounded stochastically,
with the bits of NOTE [random bits] (csrc/random_bits.h).
"""

from __future__ import annotations

from typing import List  # schemas: torch < 2.7 cannot read list[Tensor]

import torch
from torch import Tensor

from .._dtypes import opmath_dtype
from ._low_precision import committer, learning_rate_value, math_grad, store_param
from ._multi_tensor import (check_quantized_layouts, group_by_device_and_dtype, learning_rate, make_dense, on_device,
                            present_or_empty)
from ._registry import Op
from .state_codec import (SLOT_ADAM_PARAM, SLOT_EXP_AVG, SLOT_EXP_AVG_SQ, SLOT_MAX_EXP_AVG_SQ, load_moment,
                          memory_order, round_bf16, rounding_bits, store_moment)

_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "master_params",
            "compensations", "exp_avg_absmaxes", "exp_avg_sq_absmaxes", "max_exp_avg_sq_absmaxes")
_ABSMAXES = ("exp_avg_absmaxes", "exp_avg_sq_absmaxes", "max_exp_avg_sq_absmaxes")
ADAM = Op("adam_step", mutates_args=_MUTATED)


@ADAM.reference
def adam_step_reference(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], master_params: List[Tensor],
    compensations: List[Tensor], exp_avg_absmaxes: List[Tensor], exp_avg_sq_absmaxes: List[Tensor],
    max_exp_avg_sq_absmaxes: List[Tensor], rng_seeds: List[int], lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
    grad_mult: Tensor | None = None, found_inf: Tensor | None = None, lr_tensor: Tensor | None = None,
) -> None:
    commit = committer(found_inf)
    lr = learning_rate_value(lr, lr_tensor)
    # Every tensor is walked in memory order, the order of the int8 blocks and the random bits.
    for i, param in enumerate(params):
        acc = opmath_dtype(param.dtype)

        def coef(x):  # a double coefficient rounded once to the math dtype
            return x.to(acc) if isinstance(x, Tensor) else x

        def absmax(lists):
            return lists[i] if lists else None

        # Bias corrections in double, as torch.optim computes them from Python floats.
        step = state_steps[i].to(torch.float64) + 1
        bits = rounding_bits(rng_seeds, i, step, param.numel())
        master = memory_order(master_params[i]) if master_params else None
        p = (master if master is not None else memory_order(param)).to(acc, copy=True)
        g = math_grad(memory_order(grads[i]), acc, grad_mult, maximize)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(coef(1 - lr * weight_decay))
            else:
                g = g.add(p, alpha=weight_decay)
        m = load_moment(exp_avgs[i], absmax(exp_avg_absmaxes), True, acc)
        v = load_moment(exp_avg_sqs[i], absmax(exp_avg_sq_absmaxes), False, acc)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction2_sqrt = (1 - beta2**step).sqrt().to(acc)
        neg_step_size = (-lr / (1 - beta1**step)).to(acc)
        if amsgrad:
            vmax = torch.maximum(load_moment(max_exp_avg_sqs[i], absmax(max_exp_avg_sq_absmaxes), False, acc), v)
            store_moment(commit, max_exp_avg_sqs[i], absmax(max_exp_avg_sq_absmaxes), vmax, False,
                         bits(SLOT_MAX_EXP_AVG_SQ))
            denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.add_(neg_step_size * m / denom)  # param.addcdiv_(exp_avg, denom, value=-step_size)

        store_moment(commit, exp_avgs[i], absmax(exp_avg_absmaxes), m, True, bits(SLOT_EXP_AVG))
        store_moment(commit, exp_avg_sqs[i], absmax(exp_avg_sq_absmaxes), v, False, bits(SLOT_EXP_AVG_SQ))
        comp = memory_order(compensations[i]) if compensations else None
        if rng_seeds and param.dtype == torch.bfloat16 and master is None and comp is None:
            commit(memory_order(param), round_bf16(p, bits(SLOT_ADAM_PARAM)))
        else:
            store_param(lambda t: t.to(acc), commit, memory_order(param), p, master=master, compensation=comp)
        commit(state_steps[i], state_steps[i] + 1)


@ADAM.impl("triton", checked=True)
def adam_step_triton(*args) -> None:
    from pyeff.kernels.adam import adam_step

    ADAM.check(*args)
    adam_step(*args)


def adam_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], master_params: list[Tensor | None] | None = None,
    compensations: list[Tensor | None] | None = None, *, exp_avg_absmaxes: list[Tensor | None] | None = None,
    exp_avg_sq_absmaxes: list[Tensor | None] | None = None, max_exp_avg_sq_absmaxes: list[Tensor | None] | None = None,
    rng_seeds: list[int] | None = None, lr: float | Tensor, beta1: float, beta2: float, eps: float,
    weight_decay: float, amsgrad: bool = False, maximize: bool = False, decoupled_weight_decay: bool = False,
    grad_mult: Tensor | None = None, found_inf: Tensor | None = None, backend: str | None = None,
) -> None:
    """One Adam (or AdamW, with `decoupled_weight_decay`) step, in place, over parallel lists.

    Tensors may mix devices and dtypes: each (device, parameter dtype, gradient dtype) bucket is one
    kernel launch (one parallel region on the CPU). Gradients have their parameter's dtype, or for
    fp32/bf16/fp16 parameters any of fp32/bf16/fp16. `state_steps` are one-element float tensors,
    incremented unless the step is skipped. `master_params` / `compensations` hold, per parameter,
    its fp32 master weight / compensation buffer or None (all or none within a dtype). A tensor `lr`
    is read by the kernels (no host sync). int8-coded moments come with their absmax lists (None
    for a parameter whose moments are not codes); tensors with coded, bf16 and fp32 moments may be
    mixed (one launch each). `rng_seeds`: one seed per parameter for stochastic rounding, or None.
    See the module docstring for the math.
    """
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "max_exp_avg_sqs": max_exp_avg_sqs, "master_params": master_params or [],
             "compensations": compensations or [], "state_steps": state_steps,
             "exp_avg_absmaxes": exp_avg_absmaxes or [], "exp_avg_sq_absmaxes": exp_avg_sq_absmaxes or [],
             "max_exp_avg_sq_absmaxes": max_exp_avg_sq_absmaxes or [], "rng_seeds": rng_seeds or []}
    for (device, *_), bucket in group_by_device_and_dtype(lists, ("params", "grads", "exp_avgs")).items():
        for name in ("master_params", "compensations", *_ABSMAXES):
            bucket[name] = present_or_empty(bucket[name], name)
        steps, seeds = bucket.pop("state_steps"), bucket.pop("rng_seeds")
        absmaxes = [bucket.pop(name) for name in _ABSMAXES]  # per block, not laid out like the parameter
        if any(absmaxes):  # codes come with their absmax (the op checks), so without absmax there are none
            check_quantized_layouts("adam_step", bucket, ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
        dense, write_back = make_dense(bucket, _MUTATED)
        lr_value, lr_tensor = learning_rate(lr, device)
        ADAM(ADAM.choose(device, backend), dense["params"], dense["grads"], dense["exp_avgs"], dense["exp_avg_sqs"],
             dense["max_exp_avg_sqs"], steps, dense["master_params"], dense["compensations"], *absmaxes, seeds,
             lr_value, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
             on_device(grad_mult, device), on_device(found_inf, device), lr_tensor)
        write_back()
