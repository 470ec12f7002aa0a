"""Fused drop-in replacements for torch.optim optimizers."""

from .adagrad import Adagrad
from .adam import Adam, AdamW

__all__ = ["Adagrad", "Adam", "AdamW"]
