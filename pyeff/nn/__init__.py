"""Drop-in fused layers (torch.nn-style modules over pyeff.ops) and patch(model), which swaps them in."""

from . import functional
from .loss import CrossEntropyLoss
from .patch import LinearGELU, patch

__all__ = ["CrossEntropyLoss", "LinearGELU", "functional", "patch"]
