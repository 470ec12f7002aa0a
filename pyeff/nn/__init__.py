"""Fused layers: drop-in modules over pyeff.ops (same constructors, parameters and state_dict as torch.nn)."""

from . import functional
from .activation import GELU, LinearGELU, SwiGLU
from .norm import LayerNorm, RMSNorm

__all__ = ["GELU", "LayerNorm", "LinearGELU", "RMSNorm", "SwiGLU", "functional"]
