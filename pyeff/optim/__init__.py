"""Fused drop-in replacements for torch.optim optimizers."""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["SGD", "Adagrad", "Adam", "AdamW"]
