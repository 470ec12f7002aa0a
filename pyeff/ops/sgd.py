r"""sgd_step: one fused SGD step (momentum, dampening, Nesterov, weight decay) over lists of tensors.

The contract, per parameter i (math in fp32 for bf16/fp16 tensors, fp64 for fp64):

.. math::
    g &= \mathrm{grad}_i \cdot \mathrm{grad\_mult} \quad (\text{negated if maximize}) \\
    g &\leftarrow g + \lambda p \\
    b &\leftarrow g \ \text{(first step)} \quad\text{or}\quad b \leftarrow \mu b + (1 - \tau) g
        \qquad (\text{if } \mu \ne 0) \\
    g &\leftarrow g + \mu b \ \text{(nesterov)} \quad\text{or}\quad g \leftarrow b \\
    p &\leftarrow p - \gamma g

in the operation order of torch.optim.SGD's single-tensor implementation, each operation rounded
on its own (torch's `add_(..., alpha=)` may contract a multiply-add into one rounding).
:math:`\gamma` is `lr`, or the value of the one-element `lr_tensor` when given (read by the kernel
on the device, never on the host).

`momentum_buffers` and `is_first_step` hold one entry per parameter when momentum is not 0, else
none. torch creates a momentum buffer at a parameter's first step as a copy of its (decayed)
gradient: where `is_first_step[i]`, `momentum_buffers[i]` is an output only (its values are not
read) and becomes g. A non-zero `found_inf` skips the step entirely (NOTE [overflow skip] in
csrc/checks.h): nothing is written, a first-step buffer included. `master_params` /
`compensations` select the low-precision modes of NOTE [low-precision parameter modes]
(csrc/cpu/low_precision.h); with master weights the momentum buffers are fp32.
"""

from __future__ import annotations

from typing import List  # schemas: torch < 2.7 cannot read list[Tensor]

import torch
from torch import Tensor

from .._dtypes import opmath_dtype
from ._low_precision import committer, learning_rate_value, math_grad, store_param
from ._multi_tensor import group_by_device_and_dtype, learning_rate, make_dense, on_device, present_or_empty
from ._registry import Op

_MUTATED = ("params", "momentum_buffers", "master_params", "compensations")
SGD = Op("sgd_step", mutates_args=_MUTATED)


@SGD.reference
def sgd_step_reference(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], is_first_step: List[bool],
    master_params: List[Tensor], compensations: List[Tensor], lr: float, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool, maximize: bool, grad_mult: Tensor | None = None,
    found_inf: Tensor | None = None, lr_tensor: Tensor | None = None,
) -> None:
    commit = committer(found_inf)
    lr = learning_rate_value(lr, lr_tensor)
    neg_lr = -lr  # param.add_(grad, alpha=-lr): a double, rounded once to the math dtype below
    for i, param in enumerate(params):
        acc = opmath_dtype(param.dtype)
        p = (master_params[i] if master_params else param).to(acc, copy=True)
        g = math_grad(grads[i], acc, grad_mult, maximize)  # grad = -grad if maximize
        if weight_decay != 0:
            g = g + weight_decay * p  # grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            if is_first_step[i]:
                buf = g  # buf = grad.detach().clone()
            else:
                # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                buf = momentum_buffers[i].to(acc) * momentum + (1 - dampening) * g
            commit(momentum_buffers[i], buf)
            g = g + momentum * buf if nesterov else buf  # grad = grad.add(buf, alpha=momentum), or buf
        p = p + (neg_lr.to(acc) if isinstance(neg_lr, Tensor) else neg_lr) * g  # param.add_(grad, alpha=-lr)
        store_param(lambda t: t.to(acc), commit, param, p, master=master_params[i] if master_params else None,
                    compensation=compensations[i] if compensations else None)


@SGD.impl("triton", checked=True)
def sgd_step_triton(*args) -> None:
    from pyeff.kernels.sgd import sgd_step as launch

    SGD.check(*args)
    launch(*args)


def sgd_step(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor] | None = None,
    is_first_step: list[bool] | None = None, master_params: list[Tensor | None] | None = None,
    compensations: list[Tensor | None] | None = None, *, lr: float | Tensor, momentum: float = 0.0,
    dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
    grad_mult: Tensor | None = None, found_inf: Tensor | None = None, backend: str | None = None,
) -> None:
    """One SGD step, in place, over parallel lists (see the module docstring for the math).

    Tensors may mix devices and dtypes: each (device, parameter dtype, gradient dtype) bucket is one
    kernel launch (one parallel region on the CPU); gradient dtypes are as for adam_step. With
    momentum, `momentum_buffers` and `is_first_step` hold an entry per parameter (a first-step
    buffer is written, not read); without, they are empty or None. `master_params` /
    `compensations` hold, per parameter, its fp32 master weight / compensation buffer or None (all
    or none within a dtype). A tensor `lr` is read by the kernels (no host sync).
    """
    lists = {"params": params, "grads": grads, "momentum_buffers": momentum_buffers or [],
             "is_first_step": is_first_step or [], "master_params": master_params or [],
             "compensations": compensations or []}
    for (device, *_), bucket in group_by_device_and_dtype(lists).items():
        for name in ("master_params", "compensations"):
            bucket[name] = present_or_empty(bucket[name], name)
        first = [bool(f) for f in bucket.pop("is_first_step")]
        dense, write_back = make_dense(bucket, _MUTATED)
        lr_value, lr_tensor = learning_rate(lr, device)
        SGD(SGD.choose(device, backend), dense["params"], dense["grads"], dense["momentum_buffers"], first,
            dense["master_params"], dense["compensations"], lr_value, momentum, dampening, weight_decay, nesterov,
            maximize, on_device(grad_mult, device), on_device(found_inf, device), lr_tensor)
        write_back()
