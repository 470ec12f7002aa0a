r"""norm_forward / norm_backward: LayerNorm and RMSNorm over the last dimension of a 2-D array, with
an optional residual add fused in front.

Contract. ``x`` is (rows, n) (callers flatten the normalized dimensions), math is in fp32 (fp64 for
fp64 input), per row:

.. math::
    h &= x + \mathrm{residual} \quad \text{(rounded to x's dtype: it is returned, and the norm reads
         what is returned), or } h = x \\
    \text{LayerNorm:}\quad \mu &= \tfrac1n \textstyle\sum_j h_j, \quad
        \mathrm{rstd} = 1/\sqrt{\tfrac1n \textstyle\sum_j (h_j - \mu)^2 + \epsilon}, \quad
        y = (h - \mu)\,\mathrm{rstd}\cdot w + b \\
    \text{RMSNorm:}\quad \mathrm{rstd} &= 1/\sqrt{\tfrac1n \textstyle\sum_j h_j^2 + \epsilon}, \quad
        y = h\,\mathrm{rstd}\cdot w

``norm_forward(x, residual, weight, bias, eps, rms) -> (y, h, mean, rstd)``: ``h`` is returned
only when a residual is given (else an empty tensor); ``mean`` (LayerNorm only, else empty) and
``rstd`` are float32 (float64 for fp64 input), one per row. NOTE [what norms save]: the backward
needs only ``h`` (or ``x``), the weight and these two numbers per row, never the normalized output.

``norm_backward(dy, dh, h, weight, mean, rstd, rms, weight_grad, bias_grad) -> (dx, dweight, dbias)``
with :math:`\hat x = (h-\mu)\,\mathrm{rstd}` and :math:`g = dy \cdot w`:

.. math::
    dx &= \mathrm{rstd}\,\big(g - \overline{g} - \hat x\,\overline{g \hat x}\big) + dh
          \quad(\text{RMSNorm: without } \overline{g}) \\
    dw &= \textstyle\sum_{\text{rows}} dy\,\hat x, \qquad db = \sum_{\text{rows}} dy

where the bar is the mean over the row and ``dh`` (optional) is the gradient reaching the returned
``h`` directly. ``dx`` is the gradient of both ``x`` and ``residual``. ``dweight``/``dbias`` are
summed in fp32 (fp64) in a fixed order (NOTE [deterministic column sums], csrc/cpu/rowwise.h) and
returned in the weight's dtype (the stat dtype without weight), or empty when not asked for.

weight and bias are (n,), in x's dtype or float32 for bfloat16/float16 x; RMSNorm takes no bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._dtypes import opmath_dtype
from ._registry import Op

NORM_FORWARD = Op("norm_forward")
NORM_BACKWARD = Op("norm_backward")


@NORM_FORWARD.reference
def norm_forward_reference(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                           eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = opmath_dtype(x.dtype)
    if residual is not None:
        h_out = x + residual
        h = h_out.to(acc)
    else:
        h_out = x.new_empty(0)
        h = x.to(acc)
    n = x.shape[1]
    if rms:
        mean = h.new_empty(0)
        rstd = 1 / torch.sqrt(h.square().sum(1) / n + eps)
        y = h * rstd[:, None]
    else:
        mean = h.sum(1) / n
        centred = h - mean[:, None]
        rstd = 1 / torch.sqrt(centred.square().sum(1) / n + eps)
        y = centred * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), h_out, mean, rstd


@NORM_BACKWARD.reference
def norm_backward_reference(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor | None, mean: Tensor,
                            rstd: Tensor, rms: bool, weight_grad: bool,
                            bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    acc = opmath_dtype(h.dtype)
    n = h.shape[1]
    d = dy.to(acc)
    xhat = h.to(acc) if rms else h.to(acc) - mean[:, None]
    xhat = xhat * rstd[:, None]
    g = d * weight.to(acc) if weight is not None else d
    inner = g - xhat * ((g * xhat).sum(1, keepdim=True) / n)
    if not rms:
        inner = inner - g.sum(1, keepdim=True) / n
    dx = rstd[:, None] * inner
    if dh is not None:
        dx = dx + dh.to(acc)
    param_dtype = weight.dtype if weight is not None else acc
    dweight = (d * xhat).sum(0).to(param_dtype) if weight_grad else h.new_empty(0, dtype=param_dtype)
    dbias = d.sum(0).to(param_dtype) if bias_grad else h.new_empty(0, dtype=param_dtype)
    return dx.to(h.dtype), dweight, dbias


@NORM_FORWARD.impl("triton")
def norm_forward_triton(x, residual, weight, bias, eps, rms):
    from pyeff.kernels import norm

    return norm.norm_forward(x, residual, weight, bias, eps, rms)


@NORM_BACKWARD.impl("triton")
def norm_backward_triton(dy, dh, h, weight, mean, rstd, rms, weight_grad, bias_grad):
    from pyeff.kernels import norm

    return norm.norm_backward(dy, dh, h, weight, mean, rstd, rms, weight_grad, bias_grad)


@NORM_FORWARD.fake
def _(x, residual, weight, bias, eps, rms):
    stats = x.new_empty(x.shape[0], dtype=opmath_dtype(x.dtype))
    return (torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0),
            stats.new_empty(0) if rms else torch.empty_like(stats), stats)


@NORM_BACKWARD.fake
def _(dy, dh, h, weight, mean, rstd, rms, weight_grad, bias_grad):
    param_dtype = weight.dtype if weight is not None else opmath_dtype(h.dtype)
    n = h.shape[1]
    return (torch.empty_like(h), h.new_empty(n if weight_grad else 0, dtype=param_dtype),
            h.new_empty(n if bias_grad else 0, dtype=param_dtype))


def norm_forward(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
                 rms: bool, *, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, h, mean, rstd)`` of LayerNorm (or RMSNorm with ``rms``) over the rows of 2-D ``x``, after
    adding ``residual`` when given. See the module docstring."""
    return NORM_FORWARD(NORM_FORWARD.choose(x.device, backend), x, residual, weight, bias, eps, rms)


def norm_backward(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                  rms: bool, weight_grad: bool, bias_grad: bool, *,
                  backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`norm_forward`. See the module docstring."""
    return NORM_BACKWARD(NORM_BACKWARD.choose(h.device, backend), dy, dh, h, weight, mean, rstd, rms, weight_grad,
                         bias_grad)
