"""LayerNorm and RMSNorm on pyeff.ops.norm, with an optional residual add fused in front.

``add_layer_norm(x, residual, ...)`` returns ``(layer_norm(x + residual), x + residual)``: the
pre-norm transformer pattern ``h = h + block(h); y = norm(h)`` in one pass over memory. The modules
take the same as ``forward(input, residual=None)``.

Statistics are fp32 (fp64 for fp64 input) for every input dtype; only the input (or x + residual),
the weight and two fp32 numbers per row are saved for backward (NOTE [what norms save],
pyeff/ops/norm.py).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .._dtypes import opmath_dtype
from ..ops import norm as ops
from ._checks import check_float, check_like, param_for


class _NormFunction(torch.autograd.Function):
    """Autograd over ops.norm_forward / ops.norm_backward. Returns y, or (y, x + residual)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, n: int, eps: float, rms: bool, backend):
        shape = x.shape
        x2 = x.reshape(-1, n).contiguous()
        r2 = residual.reshape(-1, n).contiguous() if residual is not None else None
        w1 = weight.reshape(-1).contiguous() if weight is not None else None
        b1 = bias.reshape(-1).contiguous() if bias is not None else None
        y, h, mean, rstd = ops.norm_forward(x2, r2, w1, b1, eps, rms, backend=backend)
        ctx.save_for_backward(h if residual is not None else x2, w1, mean, rstd)
        ctx.shape, ctx.rms, ctx.backend, ctx.has_residual = shape, rms, backend, residual is not None
        ctx.weight_meta = (weight.shape, weight.dtype) if weight is not None else None
        ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
        ctx.set_materialize_grads(False)
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, w1, mean, rstd = ctx.saved_tensors
        n = h.shape[1]
        dy = torch.zeros_like(h) if dy is None else dy.reshape(-1, n).contiguous()
        dh = dh.reshape(-1, n).contiguous() if dh is not None else None
        weight_grad = ctx.needs_input_grad[2]
        bias_grad = ctx.needs_input_grad[3]
        dx, dw, db = ops.norm_backward(dy, dh, h, w1, mean, rstd, ctx.rms, weight_grad, bias_grad,
                                       backend=ctx.backend)
        dx = dx.view(ctx.shape)
        dw = dw.view(ctx.weight_meta[0]).to(ctx.weight_meta[1]) if weight_grad else None
        db = db.view(ctx.bias_meta[0]).to(ctx.bias_meta[1]) if bias_grad else None
        return dx, dx if ctx.has_residual else None, dw, db, None, None, None, None


def _normalized_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


def _norm(fn: str, input: Tensor, residual: Tensor | None, normalized_shape, weight: Tensor | None,
          bias: Tensor | None, eps: float | None, rms: bool, backend: str | None):
    check_float("input", input)
    shape = _normalized_shape(normalized_shape)
    if len(shape) == 0 or input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"Invalid input shape: {tuple(input.shape)}; expected (*, {', '.join(map(str, shape))}) "
                         f"for normalized_shape {shape}")
    if residual is not None:
        check_like(fn, "residual", residual, input)
    if eps is None:  # torch.nn.RMSNorm: the machine epsilon of the math's dtype
        eps = torch.finfo(opmath_dtype(input.dtype)).eps
    elif not eps >= 0:
        raise ValueError(f"Invalid eps: {eps}")
    weight = param_for(fn, "weight", weight, input, shape)
    bias = param_for(fn, "bias", bias, input, shape)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        weight, bias = weight.to(input.dtype), bias.to(input.dtype)
    return _NormFunction.apply(input, residual, weight, bias, math.prod(shape), float(eps), rms, backend)


def layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.layer_norm with fused kernels."""
    return _norm("layer_norm", input, None, normalized_shape, weight, bias, eps, False, backend)


def rms_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None, *,
             backend: str | None = None) -> Tensor:
    """torch.nn.functional.rms_norm with fused kernels (``eps=None``: the fp32 machine epsilon, fp64's
    for fp64 input, as torch)."""
    return _norm("rms_norm", input, None, normalized_shape, weight, None, eps, True, backend)


def add_layer_norm(input: Tensor, residual: Tensor, normalized_shape, weight: Tensor | None = None,
                   bias: Tensor | None = None, eps: float = 1e-5, *,
                   backend: str | None = None) -> tuple[Tensor, Tensor]:
    """``(layer_norm(input + residual), input + residual)`` in one pass; the sum is in input's dtype."""
    if residual is None:
        raise ValueError("Invalid residual: None; use pyeff.nn.functional.layer_norm without a residual")
    return _norm("add_layer_norm", input, residual, normalized_shape, weight, bias, eps, False, backend)


def add_rms_norm(input: Tensor, residual: Tensor, normalized_shape, weight: Tensor | None = None,
                 eps: float | None = None, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """``(rms_norm(input + residual), input + residual)`` in one pass; the sum is in input's dtype."""
    if residual is None:
        raise ValueError("Invalid residual: None; use pyeff.nn.functional.rms_norm without a residual")
    return _norm("add_rms_norm", input, residual, normalized_shape, weight, None, eps, True, backend)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on fused kernels: the same constructor, parameters and state_dict.

    ``forward(input, residual=None)``: with a residual, returns ``(layer_norm(input + residual),
    input + residual)`` computed in one pass. ``backend`` picks a pyeff backend (default: automatic).
    """

    backend: str | None = None  # a class default, so that a torch.nn.LayerNorm can be re-classed in place

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str | None = None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        if backend is not None:
            self.backend = backend

    def forward(self, input: Tensor, residual: Tensor | None = None):
        if residual is None:
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                              backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on fused kernels: the same constructor (``eps=None`` included), parameters
    and state_dict.

    ``forward(input, residual=None)``: with a residual, returns ``(rms_norm(input + residual),
    input + residual)`` computed in one pass.
    """

    backend: str | None = None

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, backend: str | None = None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        if backend is not None:
            self.backend = backend

    def forward(self, input: Tensor, residual: Tensor | None = None):
        if residual is None:
            return rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)
        return add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps, backend=self.backend)
