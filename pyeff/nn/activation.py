"""The activations that follow a Linear, on pyeff.ops.activation: bias + GELU and SwiGLU.

- ``bias_gelu(x, bias, approximate)`` = ``gelu(x + bias)`` with the add fused into the GELU and its
  backward (which also sums the bias gradient). ``LinearGELU`` is a torch.nn.Linear (same
  constructor, parameters, state_dict) computing ``gelu(linear(x))`` as a matmul without bias
  followed by the fused bias + GELU; ``GELU`` is torch.nn.GELU on the same kernels.
- ``swiglu(gate, up=None)`` = ``silu(gate) * up``. With ``up`` None, ``gate`` holds both along its
  last dimension, gate first: ``gate, up = x.chunk(2, dim=-1)`` (one Linear of width 2n feeding
  it). Its gradient is then one packed tensor, with no concatenation; with two inputs the two
  gradients are views of one buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import activation as ops
from ._checks import check_float, check_like, param_for


class _BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate: str, backend):
        n = x.shape[-1] if x.dim() > 0 else 1
        x2 = x.reshape(-1, n).contiguous()
        bias = bias.contiguous() if bias is not None else None
        y = ops.bias_gelu_forward(x2, bias, approximate, backend=backend)
        # Saves the input before the bias (the Linear's output), as eager saves it after the bias.
        ctx.save_for_backward(x2, bias)
        ctx.shape, ctx.approximate, ctx.backend = x.shape, approximate, backend
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        bias_grad = ctx.needs_input_grad[1]
        dx, db = ops.bias_gelu_backward(dy.reshape(x2.shape).contiguous(), x2, bias, ctx.approximate, bias_grad,
                                        backend=ctx.backend)
        return dx.view(ctx.shape), db if bias_grad else None, None, None


def bias_gelu(input: Tensor, bias: Tensor | None = None, approximate: str = "none", *,
              backend: str | None = None) -> Tensor:
    """``gelu(input + bias, approximate)`` with ``bias`` of shape (input.shape[-1],), fused; the sum is
    kept in fp32 (never rounded to input's dtype). Without a bias, torch.nn.functional.gelu."""
    check_float("input", input)
    ops.check_approximate(approximate)
    if bias is not None:
        if input.dim() == 0:
            raise ValueError("Invalid input shape: (); a bias needs a last dimension to add along")
        bias = param_for("bias_gelu", "bias", bias, input, (input.shape[-1],))
    return _BiasGeluFunction.apply(input, bias, approximate, backend)


class _SwigluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, backend):
        k = gate.shape[-1]
        g2 = gate.reshape(-1, k).contiguous()
        u2 = up.reshape(-1, k).contiguous() if up is not None else None
        y = ops.swiglu_forward(g2, u2, backend=backend)
        ctx.save_for_backward(g2, u2)
        ctx.gate_shape, ctx.backend = gate.shape, backend
        return y.view(*gate.shape[:-1], y.shape[1])

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dgrad = ops.swiglu_backward(dy.reshape(g2.shape[0], -1).contiguous(), g2, u2, backend=ctx.backend)
        if u2 is None:
            return dgrad.view(ctx.gate_shape), None, None
        n = u2.shape[1]
        return dgrad[:, :n].view(ctx.gate_shape), dgrad[:, n:].view(ctx.gate_shape), None


def swiglu(gate: Tensor, up: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """``silu(gate) * up``. With ``up`` None, ``gate``'s last dimension holds gate then up (even size)."""
    check_float("gate", gate)
    if gate.dim() == 0:
        raise ValueError("Invalid gate shape: (); expected at least one dimension")
    if up is not None:
        check_like("swiglu", "up", up, gate, like_name="gate")
    elif gate.shape[-1] % 2:
        raise ValueError(f"Invalid gate shape: {tuple(gate.shape)}; without `up` the last dimension holds gate "
                         "and up and must be even")
    return _SwigluFunction.apply(gate, up, backend)


class GELU(torch.nn.GELU):
    """torch.nn.GELU (``approximate='none'|'tanh'``) on pyeff's kernels."""

    backend: str | None = None

    def __init__(self, approximate: str = "none", *, backend: str | None = None):
        ops.check_approximate(approximate)
        super().__init__(approximate)
        if backend is not None:
            self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return bias_gelu(input, None, self.approximate, backend=self.backend)


class LinearGELU(torch.nn.Linear):
    """``gelu(linear(x))``: a torch.nn.Linear (same constructor, parameters and state_dict) whose bias
    add is fused into the GELU and its backward."""

    backend: str | None = None
    approximate: str = "none"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 approximate: str = "none", backend: str | None = None):
        ops.check_approximate(approximate)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.approximate = approximate
        if backend is not None:
            self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return bias_gelu(F.linear(input, self.weight), self.bias, self.approximate, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approximate={self.approximate!r}"


class SwiGLU(torch.nn.Module):
    """``forward(gate, up=None)`` = ``silu(gate) * up``; with one input, its last dimension holds gate
    then up. No parameters."""

    backend: str | None = None

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        if backend is not None:
            self.backend = backend

    def forward(self, gate: Tensor, up: Tensor | None = None) -> Tensor:
        return swiglu(gate, up, backend=self.backend)
