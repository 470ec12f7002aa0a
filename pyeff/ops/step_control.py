r"""step_control: the scalars that steer one mixed-precision optimizer step, computed on the device.

Contract (NOTE [mixed-precision step] in pyeff/optim/_fused.py). Inputs, each optional: ``stats``
(float32 ``[sum of squares, any non-finite]`` of the gradients, from grad_stats or a DDP comm hook),
``grad_scale`` (the loss scale, one element) and ``found_inf`` (an overflow flag already found,
e.g. by torch.amp.GradScaler); ``max_grad_norm`` (0: no clipping). Output, written into the
float32 tensor ``out`` of four elements on the device of the step:

.. math::
    s &= \mathrm{fp32}(1 / \mathrm{double}(\mathrm{grad\_scale})) \ \text{(1 without a scale)} \\
    \mathrm{out}_1 &= \max(\mathrm{found\_inf}, \mathrm{stats}_1) \quad \text{(found\_inf: skip the step when non-zero)} \\
    \mathrm{out}_2 &= \sqrt{\mathrm{stats}_0}\cdot s \quad \text{(the unscaled global norm, as clip\_grad\_norm\_ returns it)} \\
    \mathrm{out}_0 &= s \cdot \min(1, (1 / (\mathrm{out}_2 + 10^{-6})) \cdot \mathrm{max\_grad\_norm}) \quad
        \text{(the gradient multiplier; } s \text{ without clipping)}

in fp32, in this order (torch.amp.GradScaler's reciprocal; clip_grad_norm_'s coefficient, whose
float-over-tensor division torch evaluates as a reciprocal and a product);
``out[3]`` is 0. Terms whose input is absent are left out (no stats: ``out_1`` = found_inf or 0,
``out_2`` = 0). Computing them on the device keeps the step free of host syncs and allocations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._registry import Op

STEP_CONTROL = Op("step_control", mutates_args=("out",))

CLIP_EPS = 1e-6  # clip_grad_norm_'s: max_norm / (total_norm + 1e-6)


@STEP_CONTROL.reference
def step_control_reference(stats: Tensor | None, grad_scale: Tensor | None, found_inf: Tensor | None,
                           max_grad_norm: float, out: Tensor) -> None:
    device = out.device
    inv_scale = torch.ones((), dtype=torch.float32, device=device)
    if grad_scale is not None:
        inv_scale = grad_scale.to(device).double().reciprocal().float().reshape(())
    found = torch.zeros((), dtype=torch.float32, device=device)
    if found_inf is not None:
        found = found_inf.to(device).float().reshape(())
    norm = torch.zeros((), dtype=torch.float32, device=device)
    if stats is not None:
        found = torch.maximum(found, stats[1])
        # sqrt in double, rounded to fp32: correctly rounded, as the kernels' (torch's own fp32 sqrt on
        # the CPU is not always)
        norm = stats[0].double().sqrt().float() * inv_scale
    mult = inv_scale
    if max_grad_norm > 0:
        mult = inv_scale * (max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    out.copy_(torch.stack([mult, found, norm, torch.zeros_like(norm)]))


@STEP_CONTROL.impl("triton", checked=True)
def step_control_triton(stats: Tensor | None, grad_scale: Tensor | None, found_inf: Tensor | None,
                        max_grad_norm: float, out: Tensor) -> None:
    from pyeff.kernels.grad_stats import step_control

    STEP_CONTROL.check(stats, grad_scale, found_inf, max_grad_norm, out)
    step_control(stats, grad_scale, found_inf, max_grad_norm, out)


def step_control(stats: Tensor | None, grad_scale: Tensor | None, found_inf: Tensor | None, max_grad_norm: float,
                 out: Tensor, *, backend: str | None = None) -> Tensor:
    """Write ``[grad_mult, found_inf, grad_norm, 0]`` (float32, on out's device) into `out` and
    return it. See the module docstring."""
    if out.dtype != torch.float32 or out.shape != (4,):
        raise ValueError(f"step_control: expected `out` to be a float32 tensor of shape (4,), got {out.dtype} "
                         f"{tuple(out.shape)}")
    if not max_grad_norm >= 0:
        raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
    if max_grad_norm > 0 and stats is None:
        raise ValueError("step_control: clipping (`max_grad_norm` > 0) needs the gradients' `stats`")
    for name, t in (("stats", stats), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and t.device != out.device:
            raise ValueError(f"step_control: `{name}` is on {t.device} but `out` on {out.device}")
    if stats is not None and (stats.dtype != torch.float32 or stats.shape != (2,)):
        raise ValueError(f"step_control: expected `stats` to be float32 of shape (2,), got {stats.dtype} "
                         f"{tuple(stats.shape)}")
    STEP_CONTROL(STEP_CONTROL.choose(out.device, backend), stats, grad_scale, found_inf, float(max_grad_norm), out)
    return out
