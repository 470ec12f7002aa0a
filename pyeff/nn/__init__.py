"""Drop-in fused layers (torch.nn-style modules over pyeff.ops) and patch(model), which swaps them in."""

from . import functional
from .loss import CrossEntropyLoss
from .patch import patch

__all__ = ["CrossEntropyLoss", "functional", "patch"]
