"""Fused layers: drop-in modules over pyeff.ops (same constructors, parameters and state_dict as
torch.nn), and patch(model), which swaps them in."""

from . import functional
from .activation import GELU, LinearGELU, SwiGLU
from .loss import CrossEntropyLoss
from .norm import LayerNorm, RMSNorm
from .patch import patch

__all__ = ["CrossEntropyLoss", "GELU", "LayerNorm", "LinearGELU", "RMSNorm", "SwiGLU", "functional", "patch"]
