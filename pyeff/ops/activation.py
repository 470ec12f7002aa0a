r"""The activations that follow a Linear, forward and backward, on 2-D arrays (callers flatten the
leading dimensions). Math in fp32 (fp64 for fp64 input), one rounding per output.

bias_gelu_forward(x, bias, approximate) -> y, with h = x + bias (bias (n,) broadcast over rows, or
absent: plain GELU) kept in fp32, never rounded:

.. math::
    \texttt{'none'}:\ y = \tfrac h2\big(1 + \mathrm{erf}(h/\sqrt2)\big), \qquad
    \texttt{'tanh'}:\ y = \tfrac h2\big(1 + \tanh(\sqrt{2/\pi}\,(h + 0.044715\,h^3))\big)

bias_gelu_backward(dy, x, bias, approximate, bias_grad) -> (dx, dbias): dx = dy * gelu'(h) and, when
``bias_grad``, dbias = dx summed over rows in fp32 before rounding (NOTE [deterministic column
sums], csrc/cpu/rowwise.h), in the bias's dtype (else an empty tensor). The backward recomputes h
from x and the bias: only the Linear's output without bias is saved, as eager saves its output with
the bias.

swiglu_forward(gate, up) -> y = silu(gate) * up = gate * sigmoid(gate) * up. With ``up`` None,
``gate`` packs both along its last dimension: gate = its first half, up = its second half.

swiglu_backward(dy, gate, up) -> the gradient packed as [dgate | dup], (rows, 2n), in either form
(the module layer splits it into two views for two inputs), with s = sigmoid(gate):

.. math::
    d\mathrm{gate} = dy \cdot up \cdot s\,(1 + \mathrm{gate}\,(1 - s)), \qquad d\mathrm{up} = dy \cdot \mathrm{gate} \cdot s

Inputs are float32/float64/bfloat16/float16; the bias is in x's dtype or float32 for
bfloat16/float16 x.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._dtypes import opmath_dtype
from ._registry import Op

BIAS_GELU_FORWARD = Op("bias_gelu_forward")
BIAS_GELU_BACKWARD = Op("bias_gelu_backward")
SWIGLU_FORWARD = Op("swiglu_forward")
SWIGLU_BACKWARD = Op("swiglu_backward")

GELU_APPROXIMATIONS = ("none", "tanh")


def _gelu_and_derivative(h: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    if approximate == "tanh":
        k0, k1 = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(k0 * (h + k1 * h * h * h))
        return 0.5 * h * (1 + t), 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * k0 * (1 + 3 * k1 * h * h)
    cdf = 0.5 * (1 + torch.erf(h * math.sqrt(0.5)))
    return h * cdf, cdf + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)


def check_approximate(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"Invalid approximate: {approximate!r}; expected 'none' or 'tanh'")


@BIAS_GELU_FORWARD.reference
def bias_gelu_forward_reference(x: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    check_approximate(approximate)
    h = x.to(opmath_dtype(x.dtype))
    if bias is not None:
        h = h + bias.to(h.dtype)
    return _gelu_and_derivative(h, approximate)[0].to(x.dtype)


@BIAS_GELU_BACKWARD.reference
def bias_gelu_backward_reference(dy: Tensor, x: Tensor, bias: Tensor | None, approximate: str,
                                 bias_grad: bool) -> tuple[Tensor, Tensor]:
    check_approximate(approximate)
    if bias_grad and bias is None:
        raise RuntimeError("bias_gelu_backward: `bias_grad=True` needs the `bias`")
    h = x.to(opmath_dtype(x.dtype))
    if bias is not None:
        h = h + bias.to(h.dtype)
    dx = dy.to(h.dtype) * _gelu_and_derivative(h, approximate)[1]
    bias_dtype = bias.dtype if bias is not None else x.dtype
    dbias = dx.sum(0).to(bias_dtype) if bias_grad else x.new_empty(0, dtype=bias_dtype)
    return dx.to(x.dtype), dbias


def _split(gate: Tensor, up: Tensor | None) -> tuple[Tensor, Tensor]:
    if up is not None:
        return gate, up
    if gate.shape[1] % 2:
        raise ValueError(f"Invalid packed gate shape: {tuple(gate.shape)}; without `up` the last dimension "
                         "holds gate and up and must be even")
    return gate.chunk(2, dim=1)


@SWIGLU_FORWARD.reference
def swiglu_forward_reference(gate: Tensor, up: Tensor | None) -> Tensor:
    g, u = _split(gate, up)
    acc = opmath_dtype(g.dtype)
    g = g.to(acc)
    return (g * torch.sigmoid(g) * u.to(acc)).to(gate.dtype)


@SWIGLU_BACKWARD.reference
def swiglu_backward_reference(dy: Tensor, gate: Tensor, up: Tensor | None) -> Tensor:
    g, u = _split(gate, up)
    acc = opmath_dtype(g.dtype)
    g, u, d = g.to(acc), u.to(acc), dy.to(acc)
    s = torch.sigmoid(g)
    dgate = d * u * s * (1 + g * (1 - s))
    dup = d * g * s
    return torch.cat([dgate, dup], dim=1).to(gate.dtype)


@BIAS_GELU_FORWARD.impl("triton")
def bias_gelu_forward_triton(x, bias, approximate):
    from pyeff.kernels import activation

    return activation.bias_gelu_forward(x, bias, approximate)


@BIAS_GELU_BACKWARD.impl("triton")
def bias_gelu_backward_triton(dy, x, bias, approximate, bias_grad):
    from pyeff.kernels import activation

    return activation.bias_gelu_backward(dy, x, bias, approximate, bias_grad)


@SWIGLU_FORWARD.impl("triton")
def swiglu_forward_triton(gate, up):
    from pyeff.kernels import activation

    return activation.swiglu_forward(gate, up)


@SWIGLU_BACKWARD.impl("triton")
def swiglu_backward_triton(dy, gate, up):
    from pyeff.kernels import activation

    return activation.swiglu_backward(dy, gate, up)


@BIAS_GELU_FORWARD.fake
def _(x, bias, approximate):
    return torch.empty_like(x)


@BIAS_GELU_BACKWARD.fake
def _(dy, x, bias, approximate, bias_grad):
    bias_dtype = bias.dtype if bias is not None else x.dtype
    return torch.empty_like(x), x.new_empty(x.shape[1] if bias_grad else 0, dtype=bias_dtype)


@SWIGLU_FORWARD.fake
def _(gate, up):
    n = gate.shape[1] if up is not None else gate.shape[1] // 2
    return gate.new_empty(gate.shape[0], n)


@SWIGLU_BACKWARD.fake
def _(dy, gate, up):
    return gate.new_empty(dy.shape[0], 2 * dy.shape[1])


def bias_gelu_forward(x: Tensor, bias: Tensor | None, approximate: str = "none", *,
                      backend: str | None = None) -> Tensor:
    """gelu(x + bias) over the rows of 2-D ``x``. See the module docstring."""
    return BIAS_GELU_FORWARD(BIAS_GELU_FORWARD.choose(x.device, backend), x, bias, approximate)


def bias_gelu_backward(dy: Tensor, x: Tensor, bias: Tensor | None, approximate: str = "none",
                       bias_grad: bool = True, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """``(dx, dbias)`` of :func:`bias_gelu_forward`. See the module docstring."""
    return BIAS_GELU_BACKWARD(BIAS_GELU_BACKWARD.choose(x.device, backend), dy, x, bias, approximate, bias_grad)


def swiglu_forward(gate: Tensor, up: Tensor | None, *, backend: str | None = None) -> Tensor:
    """silu(gate) * up over 2-D arrays (``up`` None: both packed in ``gate``). See the module docstring."""
    return SWIGLU_FORWARD(SWIGLU_FORWARD.choose(gate.device, backend), gate, up)


def swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor | None, *, backend: str | None = None) -> Tensor:
    """``[dgate | dup]`` of :func:`swiglu_forward`, packed as (rows, 2n). See the module docstring."""
    return SWIGLU_BACKWARD(SWIGLU_BACKWARD.choose(gate.device, backend), dy, gate, up)
