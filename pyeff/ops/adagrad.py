r"""adagrad_step: one fused Adagrad step over lists of tensors, dense and sparse gradients alike.

The contract, per parameter i with step count t after the increment (math in fp32 for bf16/fp16
tensors, fp64 for fp64):

.. math::
    g &= \mathrm{grad}_i \cdot \mathrm{grad\_mult} \quad (\text{negated if maximize}) \\
    \tilde\gamma &= \gamma / (1 + (t - 1)\eta) \\
    g &\leftarrow g + \lambda p \quad (\text{dense gradients only}) \\
    s &\leftarrow s + g^2 \\
    p &\leftarrow p - \tilde\gamma\, g / (\sqrt{s} + \epsilon)

in the operation order of torch.optim.Adagrad's single-tensor implementation: for a dense
gradient ``param.addcdiv_(grad, std, value=-clr)``, i.e. ``p + (-clr * g) / std``; for a sparse
one ``param.add_(grad_values / std_values, alpha=-clr)``, i.e. ``p + -clr * (g / std)``.

A sparse (COO) gradient is coalesced first (repeated indices summed, as torch does: the update
is not linear), and only its rows are read and written, in the parameter, `state_sums` and the
low-precision state; weight decay is not defined for sparse gradients and raises. `grad_mult`
multiplies the coalesced values. A non-zero `found_inf` skips the step entirely (NOTE [overflow
skip] in csrc/checks.h). `master_params` / `compensations` select the low-precision modes of
NOTE [low-precision parameter modes] (csrc/cpu/low_precision.h); with master weights `state_sums`
are fp32. :math:`\gamma` is `lr`, or the value of the one-element `lr_tensor` when given (read on
the device).

Compressed state (NOTE [compressed optimizer state] in csrc/state_codec.h): `state_sums` may be
float32, bfloat16, or uint8 codes laid out like the parameter with their blocks' fp32 absmax in
`state_sum_absmaxes` (empty otherwise; codes take dense gradients only: a sparse row would
requantize whole blocks it does not own). With `rng_seeds` (one per tensor) every bfloat16 sum, every
code and a bfloat16 parameter without master weights or compensation is rounded stochastically
(NOTE [random bits]); a sparse gradient's elements draw the bits of their place in the parameter.
"""

from __future__ import annotations

from typing import List  # schemas: torch < 2.7 cannot read list[Tensor]

import torch
from torch import Tensor

from .._dtypes import opmath_dtype
from ._low_precision import store_param
from ._multi_tensor import (any_sparse, check_quantized_layouts, group_by_device_and_dtype, learning_rate, make_dense,
                            on_device, present_or_empty)
from ._registry import Op
from .state_codec import (SLOT_ADAGRAD_PARAM, SLOT_SUM, dequantize_flat, memory_order, quantize_flat, round_bf16,
                          slot_bits, to_code_dtype)

_MUTATED = ("params", "state_sums", "state_steps", "master_params", "compensations", "state_sum_absmaxes")
SPARSE_CODES = "int8 block codes of `state_sums` take dense gradients only"
ADAGRAD = Op("adagrad_step", mutates_args=_MUTATED)
SPARSE_WEIGHT_DECAY = "weight_decay option is not compatible with sparse gradients"


def check_sparse_indices(grad: Tensor, where: str) -> None:
    """Indices inside the parameter's shape (torch builds sparse tensors without checking them, and
    coalescing an index outside the shape is undefined). Checked on the CPU only, where it costs no
    host sync; on CUDA the kernels stop at a bad row with a device-side assert, as torch's indexing
    kernels do."""
    idx = grad._indices()
    if idx.device.type != "cpu" or idx.numel() == 0:
        return
    sizes = torch.tensor(grad.shape[:grad.sparse_dim()], dtype=idx.dtype).unsqueeze(1)
    bad = (idx < 0) | (idx >= sizes)
    if bad.any():
        d, r = bad.nonzero()[0].tolist()
        raise RuntimeError(f"{where}: a sparse gradient of shape {tuple(grad.shape)} has index {idx[d, r].item()} "
                           f"in dimension {d}, outside its parameter's size {grad.shape[d]}")


@ADAGRAD.reference
def adagrad_step_reference(
    params: List[Tensor], grads: List[Tensor], state_sums: List[Tensor], state_steps: List[Tensor],
    master_params: List[Tensor], compensations: List[Tensor], state_sum_absmaxes: List[Tensor], rng_seeds: List[int],
    lr: float, lr_decay: float, weight_decay: float, eps: float, maximize: bool, grad_mult: Tensor | None = None,
    found_inf: Tensor | None = None, lr_tensor: Tensor | None = None,
) -> None:
    for g, s in zip(grads, state_sums):
        if g.is_sparse:
            if weight_decay != 0:
                raise RuntimeError(f"adagrad_step: {SPARSE_WEIGHT_DECAY}")
            if s.dtype == torch.uint8:
                raise RuntimeError(f"adagrad_step: {SPARSE_CODES}")
            check_sparse_indices(g, "adagrad_step")
    # Decided on the device, without a sync: a skipped step writes back the old values.
    skip = None if found_inf is None else found_inf != 0
    # The learning rate in double, as torch.optim computes from a Python float.
    lr = lr if lr_tensor is None else lr_tensor.to(torch.float64).reshape(())

    def commit(dst: Tensor, new: Tensor) -> None:
        dst.copy_(new if skip is None else torch.where(skip, dst, new))

    for i, param in enumerate(params):
        acc = opmath_dtype(param.dtype)
        grad = grads[i]
        sparse = grad.is_sparse
        step = state_steps[i].to(torch.float64) + 1
        if sparse:  # gather the touched rows; they are written back with index_put_
            grad = grad.coalesce()
            rows = tuple(grad._indices().unbind(0))
            g = grad._values().to(acc)
            index = torch.arange(param.numel(), device=param.device).view(param.shape)[rows]

            def take(t: Tensor) -> Tensor:
                return t[rows].to(acc)

            def put(t: Tensor, x: Tensor) -> None:
                x = x.to(t.dtype)
                t.index_put_(rows, x if skip is None else torch.where(skip, t[rows], x))
        else:  # every tensor in memory order, the order of the int8 blocks and the random bits
            g = memory_order(grad).to(acc)
            index = torch.arange(param.numel(), device=param.device)

            def take(t: Tensor) -> Tensor:
                return memory_order(t).to(acc, copy=True)

            def put(t: Tensor, x: Tensor) -> None:
                commit(memory_order(t), x)

        def bits(slot):
            return None if not rng_seeds else slot_bits(rng_seeds[i], step, slot, param.numel())[index]

        if grad_mult is not None:
            g = g * grad_mult.to(acc)
        if maximize:
            g = -g
        # One elementwise op per rounding, in the kernels' order (each line names the torch.optim
        # operation it mirrors; torch's own fused ops may contract a multiply-add into one rounding).
        p = take(master_params[i] if master_params else param)
        if weight_decay != 0:
            g = g + weight_decay * p  # grad.add(param, alpha=weight_decay)
        neg_clr = (-(lr / (1 + (step - 1) * lr_decay))).to(acc)  # clr in double, rounded once
        quantized = state_sums[i].dtype == torch.uint8
        if quantized:
            s = dequantize_flat(memory_order(state_sums[i]), state_sum_absmaxes[i], False).to(acc)
        else:
            s = take(state_sums[i])
        s = s + g * g  # state_sum.addcmul_(grad, grad, value=1)
        std = s.sqrt() + eps  # state_sum.sqrt().add_(eps)
        if sparse:
            p = p + neg_clr * (g / std)  # param.add_(sparse(grad_values / std_values), alpha=-clr)
        else:
            p = p + neg_clr * g / std  # param.addcdiv_(grad, std, value=-clr)

        r16 = bits(SLOT_SUM)
        if quantized:
            codes, absmax = quantize_flat(s.to(torch.float32), False, r16)
            commit(memory_order(state_sums[i]), to_code_dtype(codes, False))
            commit(state_sum_absmaxes[i], absmax)
        else:
            put(state_sums[i], round_bf16(s, r16) if r16 is not None and state_sums[i].dtype == torch.bfloat16 else s)
        if rng_seeds and param.dtype == torch.bfloat16 and not master_params and not compensations:
            put(param, round_bf16(p, bits(SLOT_ADAGRAD_PARAM)))
        else:
            store_param(take, put, param, p, master=master_params[i] if master_params else None,
                        compensation=compensations[i] if compensations else None)
        state_steps[i].copy_(state_steps[i] + (1 if skip is None else (~skip).to(state_steps[i].dtype)))


@ADAGRAD.impl("triton", checked=True)
def adagrad_step_triton(*args) -> None:
    from pyeff.kernels.adagrad import adagrad_step

    ADAGRAD.check(*args)
    adagrad_step(*args)


def _with_kernel_layouts(bucket: dict[str, list], carried: tuple[str, ...] = ()):
    """(lists, write_back): make_dense for the tensors of dense gradients; for a sparse gradient the
    kernels address rows in the parameter and its state, so those must be contiguous. Those come
    last; the `carried` lists (per tensor, not laid out like it) follow the same order untouched."""
    kept = {name: bucket.pop(name) for name in carried}
    sparse_at = [i for i, g in enumerate(bucket["grads"]) if g.is_sparse] if any_sparse(bucket["grads"]) else []
    if not sparse_at:
        lists, write_back = make_dense(bucket, _MUTATED)
        return {**lists, **kept}, write_back
    is_sparse = set(sparse_at)
    dense_at = [i for i in range(len(bucket["params"])) if i not in is_sparse]

    def pick(idx, lists=bucket):
        return {name: [ts[i] for i in idx] if ts else [] for name, ts in lists.items()}

    dense, dense_write_back = make_dense(pick(dense_at), _MUTATED)
    sparse = pick(sparse_at)
    pending: list[tuple[Tensor, Tensor]] = []
    for name, ts in sparse.items():
        if name == "grads":
            continue
        for j, t in enumerate(ts):
            if not t.is_contiguous():
                ts[j] = t.contiguous()
                if name in _MUTATED:
                    pending.append((t, ts[j]))

    def write_back():
        dense_write_back()
        for original, copy in pending:
            original.copy_(copy)

    kept = pick(dense_at + sparse_at, kept)
    return {**{name: dense[name] + sparse[name] for name in bucket}, **kept}, write_back


def adagrad_step(
    params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor], state_steps: list[Tensor],
    master_params: list[Tensor | None] | None = None, compensations: list[Tensor | None] | None = None, *,
    state_sum_absmaxes: list[Tensor | None] | None = None, rng_seeds: list[int] | None = None, lr: float | Tensor,
    lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False,
    grad_mult: Tensor | None = None, found_inf: Tensor | None = None, backend: str | None = None,
) -> None:
    """One Adagrad step, in place, over parallel lists; gradients may be dense or sparse COO.

    Tensors may mix devices and dtypes: each (device, parameter dtype, gradient dtype, sum dtype)
    bucket is one kernel launch (one parallel region on the CPU, dense tensors and sparse rows
    together); gradient dtypes are as for adam_step. `state_steps` are one-element float tensors,
    incremented unless the step is skipped. uint8-coded sums come with their absmax (None for a
    parameter whose sum is not coded); `rng_seeds`: one seed per parameter for stochastic rounding,
    or None. See the module docstring.
    """
    lists = {"params": params, "grads": grads, "state_sums": state_sums, "state_steps": state_steps,
             "master_params": master_params or [], "compensations": compensations or [],
             "state_sum_absmaxes": state_sum_absmaxes or [], "rng_seeds": rng_seeds or []}
    for (device, *_), bucket in group_by_device_and_dtype(lists, ("params", "grads", "state_sums")).items():
        for name in ("master_params", "compensations", "state_sum_absmaxes"):
            bucket[name] = present_or_empty(bucket[name], name)
        if bucket["state_sum_absmaxes"]:  # codes come with their absmax (the op checks)
            check_quantized_layouts("adagrad_step", bucket, ("state_sums",))
        dense, write_back = _with_kernel_layouts(bucket, carried=("state_steps", "state_sum_absmaxes", "rng_seeds"))
        lr_value, lr_tensor = learning_rate(lr, device)
        ADAGRAD(ADAGRAD.choose(device, backend), dense["params"], dense["grads"], dense["state_sums"],
                dense["state_steps"], dense["master_params"], dense["compensations"], dense["state_sum_absmaxes"],
                dense["rng_seeds"], lr_value, lr_decay, weight_decay,
                eps, maximize, on_device(grad_mult, device), on_device(found_inf, device), lr_tensor)
        write_back()
