"""Functional forms of pyeff's fused layers (torch.nn.functional-style)."""

from .loss import cross_entropy, linear_cross_entropy

__all__ = ["cross_entropy", "linear_cross_entropy"]
